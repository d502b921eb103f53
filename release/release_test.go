package release

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/dist"
	versitygwserver "github.com/visualops/opsagent/internal/testutil/versitygw"
)

const testEpoch = 1767225600 // 2026-01-01

// realBuild builds the repository once per test binary (two cross
// compiles) and shares the result.
var realBuild struct {
	once   sync.Once
	outDir string
	keys   string
	pub    string
	a      *Artifacts
	err    error
}

func built(t *testing.T) (*Artifacts, string, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("cross-compiles the agent twice")
	}
	realBuild.once.Do(func() {
		dir, err := os.MkdirTemp("", "opsagent-release-test-")
		if err != nil {
			realBuild.err = err
			return
		}
		keys := filepath.Join(dir, "keys")
		realBuild.keys = keys
		realBuild.pub, realBuild.err = dist.Keygen(keys, "", true)
		if realBuild.err != nil {
			return
		}
		realBuild.outDir = filepath.Join(dir, "dist")
		realBuild.a, realBuild.err = Build(context.Background(), BuildOptions{
			Version: "2.3.1", SourceDir: "..", OutDir: realBuild.outDir,
			KeyFile: filepath.Join(keys, dist.SecretKeyFile), AllowDirty: true, SourceDateEpoch: testEpoch,
		})
	})
	if realBuild.err != nil {
		t.Fatal(realBuild.err)
	}
	return realBuild.a, realBuild.outDir, realBuild.pub
}

func TestBuildSignedReproducibleStatic(t *testing.T) {
	a, outDir, pub := built(t)
	data, err := os.ReadFile(a.Tarball)
	if err != nil {
		t.Fatal(err)
	}
	// Signature: the updater's verifier, and minisign itself when installed.
	v, err := dist.NewVerifier(pub)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.VerifyFile(a.Tarball, a.Signature); err != nil {
		t.Fatal(err)
	}
	sig, _ := os.ReadFile(a.Signature)
	tampered := append([]byte(nil), data...)
	tampered[len(tampered)/2] ^= 1
	if err := v.Verify(tampered, sig); !errors.Is(err, dist.ErrBadSignature) {
		t.Fatalf("a tampered tarball: %v", err)
	}
	if mini, err := exec.LookPath("minisign"); err == nil {
		out, err := exec.Command(mini, "-V", "-p", filepath.Join(filepath.Dir(outDir), "keys", dist.PublicKeyFile), "-m", a.Tarball).CombinedOutput()
		if err != nil {
			t.Fatalf("minisign -V refuses our signature: %v\n%s", err, out)
		}
		t.Logf("minisign -V: %s", bytes.TrimSpace(out))
	} else {
		t.Log("minisign not installed: verified with our verifier only")
	}
	// Checksum file in sha256sum format.
	sum, _ := os.ReadFile(a.Checksum)
	if string(sum) != a.SHA256+"  opsagent.tgz\n" {
		t.Errorf("checksum file %q", sum)
	}
	cmd := exec.Command("sha256sum", "-c", dist.ChecksumName)
	cmd.Dir = outDir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("sha256sum -c: %v %s", err, out)
	}

	// Contents and modes.
	dest := t.TempDir()
	if err := archive.Extract(context.Background(), bytes.NewReader(data), dest, archive.DefaultLimits()); err != nil {
		t.Fatal(err)
	}
	want := map[string]os.FileMode{"VERSION": 0o644, "opsagent-linux-amd64": 0o755, "opsagent-linux-arm64": 0o755, "userdata.sh": 0o755}
	entries, _ := os.ReadDir(dest)
	if len(entries) != len(want) {
		t.Errorf("tarball holds %d entries, want %d", len(entries), len(want))
	}
	for name, mode := range want {
		st, err := os.Stat(filepath.Join(dest, name))
		if err != nil || st.Mode().Perm() != mode {
			t.Errorf("%s: %v %v", name, st, err)
			continue
		}
		t.Logf("%s %v %d bytes", name, st.Mode(), st.Size())
	}
	for _, arch := range []struct {
		name    string
		machine elf.Machine
	}{{"amd64", elf.EM_X86_64}, {"arm64", elf.EM_AARCH64}} {
		f, err := elf.Open(filepath.Join(dest, "opsagent-linux-"+arch.name))
		if err != nil {
			t.Fatalf("%s: not ELF: %v", arch.name, err)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Errorf("%s has an ELF interpreter: not static", arch.name)
			}
		}
		if f.Machine != arch.machine {
			t.Errorf("%s: machine %v", arch.name, f.Machine)
		}
		f.Close()
	}
	out, err := exec.Command(filepath.Join(dest, "opsagent-linux-amd64"), "version", "--json").Output()
	var info struct{ Version, Commit string }
	if err != nil || json.Unmarshal(out, &info) != nil || info.Version != "2.3.1" || info.Commit != a.Commit {
		t.Errorf("amd64 binary version: %s %v (want 2.3.1, commit %s)", out, err, a.Commit)
	}
	ud, _ := os.ReadFile(filepath.Join(dest, "userdata.sh"))
	if !bytes.Contains(ud, []byte("VERSION='2.3.1'")) {
		t.Errorf("userdata.sh not rendered:\n%s", ud)
	}
	if v, _ := os.ReadFile(filepath.Join(dest, "VERSION")); string(v) != "2.3.1\n" {
		t.Errorf("VERSION %q", v)
	}
	if a.Size > 25<<20 {
		t.Logf("tarball is %d bytes, over the 25 MiB goal", a.Size)
	}
}

// TestBuildIsReproducible rebuilds with the same key: the same tarball,
// and (ed25519 being deterministic, the trusted comment fixed) the same
// signature.
func TestBuildIsReproducible(t *testing.T) {
	a, _, _ := built(t)
	dir := t.TempDir()
	again, err := Build(context.Background(), BuildOptions{
		Version: "2.3.1", SourceDir: "..", OutDir: dir, AllowDirty: true, SourceDateEpoch: testEpoch,
		KeyFile: filepath.Join(realBuild.keys, dist.SecretKeyFile),
	})
	if err != nil {
		t.Fatal(err)
	}
	if again.SHA256 != a.SHA256 {
		t.Fatalf("two builds differ: %s vs %s", again.SHA256, a.SHA256)
	}
	sig1, _ := os.ReadFile(a.Signature)
	sig2, _ := os.ReadFile(again.Signature)
	if len(sig1) == 0 || !bytes.Equal(sig1, sig2) {
		t.Errorf("two signatures differ:\n%s\n%s", sig1, sig2)
	}
}

// TestBuildEmbedsReleaseKey: the binaries of a signed build carry the
// signing key's public half (dist.EmbeddedPublicKey), those of an unsigned
// build carry none, and an unsigned build removes a stale signature.
func TestBuildEmbedsReleaseKey(t *testing.T) {
	a, _, pub := built(t)
	signed := extract(t, a.Tarball)
	for _, arch := range dist.Arches() {
		bin, _ := os.ReadFile(filepath.Join(signed, dist.BinaryName(arch)))
		// The linker drops a variable nothing reads, -X value included.
		if !bytes.Contains(bin, []byte(pub)) {
			t.Errorf("signed %s: the public key %s is not in the binary: does cmd/opsagent call dist.EmbeddedPublicKey (the updater's trusted keys)?", arch, pub)
		}
		// Present as the variable's value, not merely as a recorded
		// -ldflags string (go records those without -trimpath).
		if bytes.Contains(bin, []byte("releasePubKey="+pub)) {
			t.Errorf("signed %s: the -X flag itself is in the binary", arch)
		}
	}

	dir := t.TempDir()
	stale := filepath.Join(dir, dist.SignatureName)
	if err := os.WriteFile(stale, []byte("stale"), 0o644); err != nil {
		t.Fatal(err)
	}
	unsigned, err := Build(context.Background(), BuildOptions{
		Version: "2.3.1", SourceDir: "..", OutDir: dir, AllowDirty: true, SourceDateEpoch: testEpoch,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) || unsigned.Signature != "" {
		t.Errorf("an unsigned build left a signature: %v %q", err, unsigned.Signature)
	}
	plain := extract(t, unsigned.Tarball)
	for _, arch := range dist.Arches() {
		bin, _ := os.ReadFile(filepath.Join(plain, dist.BinaryName(arch)))
		if len(bin) == 0 || bytes.Contains(bin, []byte(pub)) {
			t.Errorf("unsigned %s (%d bytes) carries the release key", arch, len(bin))
		}
	}
}

// TestBuildLdflags checks the flags handed to go build without building.
func TestBuildLdflags(t *testing.T) {
	dir := t.TempDir()
	pub, err := dist.Keygen(filepath.Join(dir, "keys"), "", true)
	if err != nil {
		t.Fatal(err)
	}
	for _, keyFile := range []string{"", filepath.Join(dir, "keys", dist.SecretKeyFile)} {
		var flags []string
		run := func(ctx context.Context, d string, env []string, name string, args ...string) ([]byte, error) {
			if name == "go" {
				flags = append(flags, args[slices.Index(args, "-ldflags")+1])
			}
			return fakeGit("")(ctx, d, env, name, args...)
		}
		if _, err := Build(context.Background(), BuildOptions{Version: "2.1", OutDir: filepath.Join(dir, "out"), KeyFile: keyFile, Run: run}); err != nil {
			t.Fatal(err)
		}
		if len(flags) != len(dist.Arches()) {
			t.Fatalf("%d go builds, want one per arch", len(flags))
		}
		for _, f := range flags {
			embeds := strings.Contains(f, "internal/dist.releasePubKey="+pub)
			if embeds != (keyFile != "") || !strings.Contains(f, "version.Version=2.1") {
				t.Errorf("key %q: -ldflags %q", keyFile, f)
			}
		}
	}
}

// extract unpacks a tarball into a temporary directory.
func extract(t *testing.T, tarball string) string {
	t.Helper()
	data, err := os.ReadFile(tarball)
	if err != nil {
		t.Fatal(err)
	}
	dest := t.TempDir()
	if err := archive.Extract(context.Background(), bytes.NewReader(data), dest, archive.DefaultLimits()); err != nil {
		t.Fatal(err)
	}
	return dest
}

// fakeGit answers git and go commands without running them.
func fakeGit(status string) Runner {
	return func(_ context.Context, _ string, _ []string, name string, args ...string) ([]byte, error) {
		switch {
		case name == "git" && args[0] == "status":
			return []byte(status), nil
		case name == "git" && args[0] == "rev-parse":
			return []byte("abc123\n"), nil
		case name == "git" && args[0] == "log":
			return []byte("1767225600\n"), nil
		case name == "go":
			out := args[len(args)-2]
			return nil, os.WriteFile(out, []byte("\x7fELF fake "+out), 0o755)
		}
		return nil, errors.New("unexpected command " + name)
	}
}

func TestBuildRefusals(t *testing.T) {
	dir := t.TempDir()
	for _, v := range []string{"2", "v2.1", "2.1.3.4", "2.x", "", "2.1-rc1"} {
		if _, err := Build(context.Background(), BuildOptions{Version: v, OutDir: dir, Run: fakeGit("")}); err == nil || !strings.Contains(err.Error(), "MAJOR.MINOR") {
			t.Errorf("version %q: %v", v, err)
		}
	}
	_, err := Build(context.Background(), BuildOptions{Version: "2.1", OutDir: dir, Run: fakeGit(" M agent/agent.go\n")})
	if err == nil || !strings.Contains(err.Error(), "uncommitted changes") || !strings.Contains(err.Error(), "--allow-dirty") || !strings.Contains(err.Error(), "agent/agent.go") {
		t.Fatalf("dirty tree: %v", err)
	}
	a, err := Build(context.Background(), BuildOptions{Version: "2.1", OutDir: dir, Run: fakeGit(" M x\n"), AllowDirty: true})
	if err != nil || a.Commit != "abc123" {
		t.Fatalf("allow-dirty: %+v %v", a, err)
	}
	if _, err := Build(context.Background(), BuildOptions{Version: "2.1", OutDir: dir, Run: fakeGit(""), KeyFile: filepath.Join(dir, "nope.key")}); err == nil || !strings.Contains(err.Error(), "nope.key") {
		t.Errorf("missing key: %v", err)
	}
}

// versitygw runs a real S3-protocol server (see package versitygw).
func versitygw(t *testing.T) (endpoint string, creds *credentials.Credentials, dir string) {
	t.Helper()
	return versitygwserver.Start(t)
}

func TestPublishToS3(t *testing.T) {
	endpoint, creds, _ := versitygw(t)
	a, outDir, _ := built(t)
	ctx := context.Background()
	client, err := minio.New(strings.TrimPrefix(endpoint, "http://"), &minio.Options{Creds: creds, Region: "us-east-1", BucketLookup: minio.BucketLookupPath})
	if err != nil {
		t.Fatal(err)
	}
	if err := client.MakeBucket(ctx, "releases", minio.MakeBucketOptions{}); err != nil {
		t.Fatal(err)
	}
	// versitygw accepts the public-read object ACL but serves anonymous
	// reads only through a bucket policy, as a real release bucket would.
	policy := `{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":["s3:GetObject"],"Resource":["arn:aws:s3:::releases/*"]}]}`
	if err := client.SetBucketPolicy(ctx, "releases", policy); err != nil {
		t.Fatal(err)
	}
	opts := PublishOptions{Bucket: "releases", Version: "2.3.1", Endpoint: endpoint, Prefix: "opsagent/", Dist: outDir, Creds: creds}

	// A failure before latest.json leaves latest.json untouched (absent).
	failing := opts
	failing.beforeLatest = func() error { return errors.New("injected failure") }
	if _, err := Publish(ctx, failing); err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("injected failure: %v", err)
	}
	if _, err := client.StatObject(ctx, "releases", "opsagent/latest.json", minio.StatObjectOptions{}); err == nil {
		t.Fatal("latest.json written although the publish failed before it")
	}
	// The version now exists: a second publish is refused without --force.
	if _, err := Publish(ctx, opts); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("overwrite: %v", err)
	}
	opts.Force = true
	latest, err := Publish(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if latest.SHA256 != a.SHA256 || latest.Version != "2.3.1" {
		t.Errorf("latest %+v", latest)
	}
	for key, ct := range map[string]string{"opsagent/2.3.1/opsagent.tgz": "application/gzip", "opsagent/latest.json": "application/json"} {
		info, err := client.StatObject(ctx, "releases", key, minio.StatObjectOptions{})
		if err != nil || info.ContentType != ct {
			t.Errorf("%s: content type %q %v, want %s", key, info.ContentType, err, ct)
		}
	}
	// Objects read back as an instance would: a plain, anonymous HTTP GET.
	for _, key := range []string{"opsagent/2.3.1/opsagent.tgz", "opsagent/2.3.1/opsagent.tgz.sha256", "opsagent/2.3.1/opsagent.tgz.minisig", "opsagent/latest.json"} {
		resp, err := http.Get(endpoint + "/releases/" + key)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d", key, resp.StatusCode)
		}
		if key == "opsagent/2.3.1/opsagent.tgz" {
			local, _ := os.ReadFile(a.Tarball)
			if !bytes.Equal(body, local) {
				t.Error("downloaded tarball differs")
			}
		}
		if key == "opsagent/latest.json" {
			var l dist.Latest
			if json.Unmarshal(body, &l) != nil || l.SHA256 != a.SHA256 {
				t.Errorf("latest.json %s", body)
			}
		}
	}
	// Wrong credentials: a clear error.
	bad := opts
	bad.Creds = credentials.NewStaticV4("testkey", "wrong-secret", "")
	if _, err := Publish(ctx, bad); err == nil || !strings.Contains(err.Error(), "AWS_SECRET_ACCESS_KEY") {
		t.Fatalf("wrong credentials: %v", err)
	}
}

func BenchmarkReleaseBuild(b *testing.B) {
	dir := b.TempDir()
	for i := 0; i < b.N; i++ {
		begin := time.Now()
		a, err := Build(context.Background(), BuildOptions{Version: "2.3.1", SourceDir: "..", OutDir: dir, AllowDirty: true, SourceDateEpoch: testEpoch})
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(time.Since(begin).Seconds(), "build-s")
		b.ReportMetric(float64(a.Size)/(1<<20), "tarball-MiB")
	}
}
