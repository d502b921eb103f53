package native

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/visualops/opsagent/internal/testutil/imds"
	"github.com/visualops/opsagent/internal/testutil/versitygw"
)

// tgzOf is a .tar.gz of files (name → content; a name ending in "/" is a
// directory, one holding " -> " a symlink).
func tgzOf(t testing.TB, files map[string]string) []byte {
	t.Helper()
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, name := range sortedKeys(files) {
		body := files[name]
		h := &tar.Header{Name: name, Mode: 0o644, Typeflag: tar.TypeReg, Size: int64(len(body))}
		switch {
		case strings.HasSuffix(name, "/"):
			h.Typeflag, h.Mode, h.Size = tar.TypeDir, 0o755, 0
		case strings.Contains(name, " -> "):
			n, target, _ := strings.Cut(name, " -> ")
			h.Name, h.Typeflag, h.Linkname, h.Size = n, tar.TypeSymlink, target, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			io.WriteString(tw, body)
		}
	}
	tw.Close()
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	zw.Write(raw.Bytes())
	zw.Close()
	return out.Bytes()
}

func zipArchiveOf(t testing.TB, files map[string]string) []byte {
	t.Helper()
	var out bytes.Buffer
	zw := zip.NewWriter(&out)
	for _, name := range sortedKeys(files) {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(w, files[name])
	}
	zw.Close()
	return out.Bytes()
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func md5Of(data []byte) string {
	s := md5.Sum(data)
	return hex.EncodeToString(s[:])
}

func sha256Of(data []byte) string {
	s := sha256.Sum256(data)
	return hex.EncodeToString(s[:])
}

// files serves files on loopback; content can change between rounds.
type files struct {
	mu    sync.Mutex
	data  map[string][]byte
	URL   string
	count map[string]int
}

func serveFiles(t testing.TB) *files {
	f := &files{data: map[string][]byte{}, count: map[string]int{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.count[r.URL.Path]++
		data, ok := f.data[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(data)
	}))
	t.Cleanup(srv.Close)
	f.URL = srv.URL
	return f
}

func (f *files) put(p string, data []byte) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.data[p] = data
	return f.URL + p
}

func (f *files) hits(p string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.count[p]
}

// countingTransport counts the HTTP requests the agent makes.
type countingTransport struct {
	n atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return http.DefaultTransport.RoundTrip(r)
}

// archiveRig is a Debian rig whose HTTP requests are counted.
func archiveRig(t *testing.T) (*debianRig, *countingTransport) {
	r := newDebianRig(t)
	ct := &countingTransport{}
	r.e = New(Options{Root: r.e.opts.Root, Runner: r.runs, StateDir: filepath.Join(r.root, "var/lib/visualops/opsagent"), HTTPClient: &http.Client{Transport: ct}})
	return r, ct
}

func archiveParam(kv ...string) string { return gitParam(kv...) }

// An archive is extracted once: a round with the same source and
// checksum downloads nothing and extracts nothing (Salt 2014 downloaded
// it again every round without a checksum), until the checksum or the
// source changes or what it extracted is gone.
func TestArchiveExtractsOnce(t *testing.T) {
	r, ct := archiveRig(t)
	srv := serveFiles(t)
	tgz := tgzOf(t, map[string]string{"app/": "", "app/index.html": "v1\n", "app/bin/run.sh": "#!/bin/sh\n", "app/current -> bin": ""})
	url := srv.put("/app-1.tar.gz", tgz)
	param := archiveParam("source", url, "path", "/opt/www")

	first := mustApply(t, r, "common.archive", param)
	if !first.Changed || !strings.Contains(first.Comment, "extracted in /opt/www: 4 entries") {
		t.Fatalf("first round: %+v", first)
	}
	if readIn(t, r.root, "/opt/www/app/index.html") != "v1\n" {
		t.Fatal("not extracted")
	}
	if l, _ := os.Readlink(filepath.Join(r.root, "opt/www/app/current")); l != "bin" {
		t.Fatalf("link %q", l)
	}
	before := treeStamp(t, filepath.Join(r.root, "opt/www"))
	n := ct.n.Load()
	second := mustApply(t, r, "common.archive", param)
	if second.Changed || !strings.Contains(second.Comment, "already extracted in /opt/www") || ct.n.Load() != n {
		t.Fatalf("second round: %+v, %d requests", second, ct.n.Load()-n)
	}
	assertStampSame(t, before, treeStamp(t, filepath.Join(r.root, "opt/www")))
	if check := r.apply(t, "common.archive", param, true); check.Changed || ct.n.Load() != n {
		t.Fatalf("check mode: %+v", check)
	}
	none(t, r.runs, 0)

	// The same URL, new content, no checksum: not seen (documented).
	srv.put("/app-1.tar.gz", tgzOf(t, map[string]string{"app/index.html": "v1 changed\n"}))
	if res := mustApply(t, r, "common.archive", param); res.Changed {
		t.Fatalf("new content behind the same URL, no checksum: %+v", res)
	}
	// A checksum of it: extracted (over the old files).
	changedTgz := tgzOf(t, map[string]string{"app/index.html": "v1 changed\n"})
	withSum := archiveParam("source", url, "path", "/opt/www", "checksum", "sha256:"+sha256Of(changedTgz))
	if res := mustApply(t, r, "common.archive", withSum); !res.Changed || !strings.Contains(res.Comment, "1 existing files replaced (sha256 verified)") || readIn(t, r.root, "/opt/www/app/index.html") != "v1 changed\n" {
		t.Fatalf("with a checksum: %+v", res)
	}
	if readIn(t, r.root, "/opt/www/app/bin/run.sh") != "#!/bin/sh\n" {
		t.Fatal("files the archive does not name were removed")
	}
	n = ct.n.Load()
	if res := mustApply(t, r, "common.archive", withSum); res.Changed || ct.n.Load() != n {
		t.Fatalf("same checksum again: %+v", res)
	}
	// What it extracted is gone: extracted again.
	if err := os.RemoveAll(filepath.Join(r.root, "opt/www/app")); err != nil {
		t.Fatal(err)
	}
	if res := mustApply(t, r, "common.archive", withSum); !res.Changed || readIn(t, r.root, "/opt/www/app/index.html") != "v1 changed\n" {
		t.Fatalf("after removal: %+v", res)
	}
}

// A zip with the catalogue's md5: checksum; a wrong checksum extracts
// nothing and creates nothing.
func TestArchiveZipAndWrongChecksum(t *testing.T) {
	r, ct := archiveRig(t)
	srv := serveFiles(t)
	z := zipArchiveOf(t, map[string]string{"wordpress/index.php": "<?php\n", "wordpress/wp-config.php": "cfg\n"})
	url := srv.put("/latest.zip", z)

	wrong := archiveParam("source", url, "path", "/tmp/test/wordpress/", "checksum", "md5:"+strings.Repeat("0", 32))
	res := r.apply(t, "common.archive", wrong, false)
	if res.OK || !strings.Contains(res.Comment, "checksum mismatch") || !strings.Contains(res.Comment, md5Of(z)) || !strings.Contains(res.Comment, "nothing was extracted") {
		t.Fatalf("wrong checksum: %+v", res)
	}
	if _, err := os.Lstat(filepath.Join(r.root, "tmp/test/wordpress")); err == nil {
		t.Fatal("a wrong checksum created the path")
	}
	if left, _ := filepath.Glob(filepath.Join(r.root, "var/lib/visualops/opsagent/archive/*")); len(left) > 0 {
		t.Fatalf("left behind: %v", left)
	}
	right := archiveParam("source", url, "path", "/tmp/test/wordpress/", "checksum", "md5:"+strings.ToUpper(md5Of(z)))
	if res := mustApply(t, r, "common.archive", right); !res.Changed || readIn(t, r.root, "/tmp/test/wordpress/wordpress/index.php") != "<?php\n" {
		t.Fatalf("zip: %+v", res)
	}
	n := ct.n.Load()
	if res := mustApply(t, r, "common.archive", right); res.Changed || ct.n.Load() != n {
		t.Fatalf("zip second round: %+v", res)
	}
	for _, bad := range []string{"file:///tmp/a.tar.gz", "/tmp/a.tar.gz", "ftp://h/a.tgz", "s3://bucket-only"} {
		if res := r.apply(t, "common.archive", archiveParam("source", bad, "path", "/x"), false); res.OK || !strings.Contains(res.Comment, "parameter source") {
			t.Errorf("source %q: %+v", bad, res)
		}
	}
	for _, bad := range []string{"md5:xyz", "crc32:1234", "md5:" + strings.Repeat("a", 31)} {
		if res := r.apply(t, "common.archive", archiveParam("source", url, "path", "/x", "checksum", bad), false); res.OK || !strings.Contains(res.Comment, "parameter checksum") {
			t.Errorf("checksum %q: %+v", bad, res)
		}
	}
}

// A hostile archive is refused, whatever its format, and leaves nothing.
func TestArchiveHostileRefused(t *testing.T) {
	r, _ := archiveRig(t)
	srv := serveFiles(t)
	for name, data := range map[string][]byte{
		"/dotdot.tar.gz":  tgzOf(t, map[string]string{"ok": "1", "../../etc/cron.d/evil": "x"}),
		"/link.tar.gz":    tgzOf(t, map[string]string{"etc -> /etc": "", "etc/evil": "x"}),
		"/abs.zip":        zipArchiveOf(t, map[string]string{"/etc/evil": "x"}),
		"/not-an-archive": []byte("<html>not found</html>"),
	} {
		url := srv.put(name, data)
		res := r.apply(t, "common.archive", archiveParam("source", url, "path", "/opt/x"), false)
		if res.OK || !strings.Contains(res.Comment, "nothing was extracted") && !strings.Contains(res.Comment, "refused") {
			t.Fatalf("%s: %+v", name, res)
		}
		if _, err := os.Lstat(filepath.Join(r.root, "opt/x")); err == nil {
			t.Fatalf("%s: the path was created", name)
		}
		if _, err := os.Lstat(filepath.Join(r.root, "etc/evil")); err == nil {
			t.Fatalf("%s: written outside", name)
		}
	}
}

// A checksum given as a URL is read each round (a small file) to tell
// whether it changed; the archive is fetched only when it did.
func TestArchiveChecksumFile(t *testing.T) {
	r, _ := archiveRig(t)
	srv := serveFiles(t)
	v1 := tgzOf(t, map[string]string{"tool/VERSION": "1\n"})
	url := srv.put("/tool.tar.gz", v1)
	sums := srv.put("/SHA256SUMS", []byte(fmt.Sprintf("%s  other.tar.gz\n%s *tool.tar.gz\n", sha256Of([]byte("x")), sha256Of(v1))))
	param := archiveParam("source", url, "path", "/opt", "checksum", sums)
	if res := mustApply(t, r, "common.archive", param); !res.Changed || readIn(t, r.root, "/opt/tool/VERSION") != "1\n" {
		t.Fatalf("first: %+v", res)
	}
	if res := mustApply(t, r, "common.archive", param); res.Changed || srv.hits("/tool.tar.gz") != 1 || srv.hits("/SHA256SUMS") != 2 {
		t.Fatalf("second: %+v; archive fetched %d times, checksum %d", res, srv.hits("/tool.tar.gz"), srv.hits("/SHA256SUMS"))
	}
	v2 := tgzOf(t, map[string]string{"tool/VERSION": "2\n"})
	srv.put("/tool.tar.gz", v2)
	srv.put("/SHA256SUMS", []byte(fmt.Sprintf("SHA256 (tool.tar.gz) = %s\n", sha256Of(v2))))
	if res := mustApply(t, r, "common.archive", param); !res.Changed || readIn(t, r.root, "/opt/tool/VERSION") != "2\n" {
		t.Fatalf("new checksum: %+v", res)
	}
}

// if-path-absent: an existing path stops the extraction, unless the
// checksum changed since the last one.
func TestArchiveIfPathAbsent(t *testing.T) {
	r, ct := archiveRig(t)
	srv := serveFiles(t)
	v1 := tgzOf(t, map[string]string{"app/v": "1\n"})
	url := srv.put("/app.tar.gz", v1)
	if err := os.MkdirAll(filepath.Join(r.root, "opt/app-installed"), 0o755); err != nil {
		t.Fatal(err)
	}
	param := archiveParam("source", url, "path", "/opt", "checksum", "md5:"+md5Of(v1))
	withAbsent := strings.Replace(param, "{", `{"if-path-absent":["/opt/app-installed"],`, 1)
	res := mustApply(t, r, "common.archive", withAbsent)
	if res.Changed || !strings.Contains(res.Comment, "/opt/app-installed exists (if-path-absent)") || ct.n.Load() != 0 {
		t.Fatalf("path present: %+v", res)
	}
	// Extracted once (without the condition), then the checksum changes.
	mustApply(t, r, "common.archive", param)
	if res := mustApply(t, r, "common.archive", withAbsent); res.Changed {
		t.Fatalf("same checksum: %+v", res)
	}
	v2 := tgzOf(t, map[string]string{"app/v": "2\n"})
	srv.put("/app.tar.gz", v2)
	param2 := archiveParam("source", url, "path", "/opt", "checksum", "md5:"+md5Of(v2))
	withAbsent2 := strings.Replace(param2, "{", `{"if-path-absent":["/opt/app-installed"],`, 1)
	if res := mustApply(t, r, "common.archive", withAbsent2); !res.Changed || readIn(t, r.root, "/opt/app/v") != "2\n" {
		t.Fatalf("checksum changed: %+v", res)
	}
}

// s3:// sources are read with the instance's credentials: here its IAM
// role, from the (loopback) metadata service, against a real S3 server.
func TestArchiveFromS3WithTheInstanceRole(t *testing.T) {
	endpoint, creds, _ := versitygw.Start(t)
	ctx := context.Background()
	client, err := minio.New(strings.TrimPrefix(endpoint, "http://"), &minio.Options{Creds: creds, Region: "us-east-1", BucketLookup: minio.BucketLookupPath})
	if err != nil {
		t.Fatal(err)
	}
	if err := client.MakeBucket(ctx, "artifacts", minio.MakeBucketOptions{}); err != nil {
		t.Fatal(err)
	}
	tgz := tgzOf(t, map[string]string{"svc/bin": "binary\n"})
	if _, err := client.PutObject(ctx, "artifacts", "svc/1.0/svc.tar.gz", bytes.NewReader(tgz), int64(len(tgz)), minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	md := imds.New(t, "i-test", "", false)
	md.SetRole("deploy-role", versitygw.AccessKey, versitygw.SecretKey, "")
	// Nothing of the test machine's own AWS setup may answer first.
	for _, k := range []string{"AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"} {
		t.Setenv(k, "")
	}
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))

	r := newDebianRig(t)
	ct := &countingTransport{}
	r.e = New(Options{Root: r.e.opts.Root, Runner: r.runs, StateDir: filepath.Join(r.root, "var/lib/visualops/opsagent"),
		HTTPClient: &http.Client{Transport: ct},
		S3:         S3Options{Endpoint: endpoint, Region: "us-east-1", MetadataURL: md.URL}})
	param := archiveParam("source", "s3://artifacts/svc/1.0/svc.tar.gz", "path", "/opt", "checksum", "sha256:"+sha256Of(tgz))
	if res := mustApply(t, r, "common.archive", param); !res.Changed || readIn(t, r.root, "/opt/svc/bin") != "binary\n" || md.RoleReads.Load() == 0 {
		t.Fatalf("s3: %+v (role read %d times)", res, md.RoleReads.Load())
	}
	n := ct.n.Load()
	if res := mustApply(t, r, "common.archive", param); res.Changed || ct.n.Load() != n {
		t.Fatalf("s3 second round: %+v, %d requests", res, ct.n.Load()-n)
	}
	res := r.apply(t, "common.archive", archiveParam("source", "s3://artifacts/svc/9.9/none.tar.gz", "path", "/opt/none"), false)
	if res.OK || !strings.Contains(res.Comment, "NoSuchKey") {
		t.Fatalf("missing object: %+v", res)
	}
}
