package native

import (
	"bufio"
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/archive"
)

// S3Options is how common.archive reads s3:// sources: with the
// credentials the instance has, as the AWS tools find them.
type S3Options struct {
	// Endpoint is the S3 endpoint's URL. Default: AWS_ENDPOINT_URL_S3,
	// else AWS_ENDPOINT_URL, else https://s3.amazonaws.com.
	Endpoint string
	// Region is the bucket's region. Default: AWS_REGION, else
	// AWS_DEFAULT_REGION, else asked of the bucket.
	Region string
	// MetadataURL is the instance metadata service that hands out the
	// instance role's credentials ([network] metadata). Default
	// http://169.254.169.254.
	MetadataURL string
	// Credentials replaces the chain: the environment
	// (AWS_ACCESS_KEY_ID…), then ~/.aws/credentials, then the instance's
	// IAM role through MetadataURL.
	Credentials *credentials.Credentials
}

// withDefaults fills what o leaves out from the environment, as the AWS
// tools do.
func (o S3Options) withDefaults() S3Options {
	if o.Endpoint == "" {
		o.Endpoint = firstEnv("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
	}
	if o.Endpoint == "" {
		o.Endpoint = "https://s3.amazonaws.com"
	}
	if o.Region == "" {
		o.Region = firstEnv("AWS_REGION", "AWS_DEFAULT_REGION")
	}
	if o.MetadataURL == "" {
		o.MetadataURL = credentials.DefaultIAMRoleEndpoint
	}
	return o
}

func firstEnv(names ...string) string {
	for _, n := range names {
		if v := os.Getenv(n); v != "" {
			return v
		}
	}
	return ""
}

// Bounds of what common.archive fetches and extracts: archives people
// deploy (a web application, a runtime) are much larger than the agent's
// own release tarball.
const (
	archiveMaxDownload = 4 << 30
	maxChecksumFile    = 1 << 20
	archiveTimeout     = time.Hour
)

var archiveLimits = archive.Limits{MaxEntries: 250_000, MaxFileSize: 8 << 30, MaxTotalSize: 32 << 30}

// archiveState is common.archive: download source, verify checksum, and
// extract it into path, all or nothing, with the agent's safe extractor
// (no absolute paths, no "..", no links out of path, no device files,
// size limits); the archive's format is told from its first bytes.
//
// What was extracted is remembered under the agent's state directory,
// per path: a round whose source and checksum are those of the last
// extraction, with its top-level entries still in path, neither
// downloads nor extracts. A checksum given as a URL is fetched each
// round (a small read) to tell whether it changed. Without a checksum,
// new content behind the same URL is not seen: change the URL (a
// versioned name) or add a checksum. Salt 2014 downloaded such an
// archive again every round.
//
// if-path-absent as module.json says: once one of its paths exists the
// archive is not extracted again, unless checksum names another value
// than the one last extracted.
func (e *Executor) archiveState(ctx context.Context, s *stateRun) (state.Result, error) {
	source, err := s.p.required("source")
	if err != nil {
		return state.Result{}, err
	}
	source = strings.TrimSpace(source)
	if err := checkSourceURL("source", source); err != nil {
		return state.Result{}, err
	}
	dest, err := absPath(s.p, "path")
	if err != nil {
		return state.Result{}, err
	}
	sumParam, err := s.p.str("checksum")
	if err != nil {
		return state.Result{}, err
	}
	sumParam = strings.TrimSpace(sumParam)
	var inline *checksum
	if sumParam != "" && !isURL(sumParam) {
		c, err := parseChecksum(sumParam)
		if err != nil {
			return state.Result{}, &badParam{"checksum", err.Error()}
		}
		inline = &c
	} else if sumParam != "" {
		if err := checkSourceURL("checksum", sumParam); err != nil {
			return state.Result{}, err
		}
	}
	absent, err := s.p.list("if-path-absent")
	if err != nil {
		return state.Result{}, err
	}
	for i, a := range absent {
		if !strings.HasPrefix(a, "/") {
			return state.Result{}, &badParam{fmt.Sprintf("if-path-absent[%d]", i), fmt.Sprintf("must be an absolute path, got %q", a)}
		}
	}
	label := "Archive " + redactURL(source)
	last := e.readMarker(dest)
	present := ""
	for _, a := range absent {
		if _, err := s.fs.Lstat(a); err == nil {
			present = a
			break
		}
	}
	sameSource := last != nil && last.Key == markerKey(source, "")
	if present != "" && (sumParam == "" || !sameSource) {
		return unchanged(fmt.Sprintf("%s not extracted: %s exists (if-path-absent)", label, present)), nil
	}
	sum := inline
	if sum == nil && sumParam != "" {
		if sum, err = e.fetchChecksum(ctx, sumParam, source); err != nil {
			return state.Result{}, failf("%s: %v", label, err)
		}
	}
	key := markerKey(source, sum.String())
	if last != nil && last.Checksum == key && e.stillExtracted(s, dest, last) {
		return unchanged(fmt.Sprintf("%s is already extracted in %s", label, dest)), nil
	}
	if present != "" && last != nil && last.Checksum == key {
		// if-path-absent holds and the checksum did not change.
		return unchanged(fmt.Sprintf("%s not extracted: %s exists (if-path-absent)", label, present)), nil
	}
	if s.test {
		return changed(fmt.Sprintf("%s would be extracted in %s", label, dest)), nil
	}
	return e.extractArchive(ctx, s, source, dest, sum, label)
}

// extractArchive downloads source, checks it against sum, extracts it
// into dest and remembers it.
func (e *Executor) extractArchive(ctx context.Context, s *stateRun, source, dest string, sum *checksum, label string) (state.Result, error) {
	ctx, cancel := context.WithTimeout(ctx, archiveTimeout)
	defer cancel()
	dir := filepath.Join(e.opts.StateDir, "archive")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return state.Result{}, failf("%s: %v", label, err)
	}
	tmp, err := os.CreateTemp(dir, ".download-*")
	if err != nil {
		return state.Result{}, failf("%s: %v", label, err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	var h hash.Hash
	var w io.Writer = tmp
	if sum != nil {
		h = sum.newHash()
		w = io.MultiWriter(tmp, h)
	}
	if err := e.fetch(ctx, source, w, archiveMaxDownload); err != nil {
		return state.Result{}, failf("%s: %v", label, err)
	}
	if sum != nil {
		if got := hex.EncodeToString(h.Sum(nil)); got != sum.hex {
			return state.Result{}, failf("%s: checksum mismatch: expected %s %s, the download has %s; nothing was extracted", label, sum.algo, sum.hex, got)
		}
	}
	format, err := archive.Detect(tmp)
	if err != nil {
		return state.Result{}, failf("%s: %v; nothing was extracted", label, err)
	}
	created := false
	if _, err := s.fs.Lstat(dest); errors.Is(err, fs.ErrNotExist) {
		created = true
	}
	// "the path will be auto-created if it doesn't exist" (module.json).
	if err := s.fs.MkdirAll(dest, defaultDirMode, nil); err != nil {
		return state.Result{}, failf("%s: creating %s: %v", label, dest, err)
	}
	real, err := s.fs.ResolveLinks(dest)
	if err != nil {
		return state.Result{}, failf("%s: %s: %v", label, dest, err)
	}
	ex, err := archive.ExtractInto(ctx, tmp, format, s.fs.HostPath(real), archiveLimits)
	if err == nil && ex.Entries == 0 {
		err = errors.New("the archive holds nothing")
	}
	if err != nil {
		if created {
			_ = s.fs.Remove(real) // all or nothing: not even the directory
		}
		return state.Result{}, failf("%s: extracting into %s: %v", label, dest, err)
	}
	m := &archiveMarker{Path: dest, Source: redactURL(source), Checksum: markerKey(source, sum.String()), Key: markerKey(source, ""), Top: ex.Top, Extracted: time.Now().UTC()}
	if err := e.writeMarker(m); err != nil {
		return state.Result{}, failf("%s: extracted in %s, but remembering it failed (the next round extracts it again): %v", label, dest, err)
	}
	comment := fmt.Sprintf("%s extracted in %s: %d entries", label, dest, ex.Entries)
	if ex.Replaced > 0 {
		comment += fmt.Sprintf(", %d existing files replaced", ex.Replaced)
	}
	if sum != nil {
		comment += fmt.Sprintf(" (%s verified)", sum.algo)
	}
	return changed(comment), nil
}

// stillExtracted reports whether dest still holds the top-level entries
// the last extraction made.
func (e *Executor) stillExtracted(s *stateRun, dest string, m *archiveMarker) bool {
	fi, err := s.fs.Stat(dest)
	if err != nil || !fi.IsDir() {
		return false
	}
	real, err := s.fs.ResolveLinks(dest)
	if err != nil {
		return false
	}
	for _, t := range m.Top {
		if _, err := s.fs.Lstat(path.Join(real, t)); err != nil {
			return false
		}
	}
	return true
}

// archiveMarker is what the agent remembers of the last extraction into
// a path.
type archiveMarker struct {
	Path   string `json:"path"`
	Source string `json:"source"` // for people: passwords hidden
	// Key identifies the source, and Checksum the source with its
	// checksum ("" when none), as hashes (a source URL may hold a
	// password).
	Key       string    `json:"key"`
	Checksum  string    `json:"checksum_key"`
	Top       []string  `json:"top"`
	Extracted time.Time `json:"extracted"`
}

func markerKey(source, sum string) string {
	h := sha256.Sum256([]byte(source + "\n" + sum))
	return hex.EncodeToString(h[:])
}

func (e *Executor) markerFile(dest string) string {
	h := sha256.Sum256([]byte(dest))
	return filepath.Join(e.opts.StateDir, "archive", hex.EncodeToString(h[:12])+".json")
}

// readMarker is the marker of dest, nil when there is none or it cannot
// be read (then the archive is extracted again: nothing is lost).
func (e *Executor) readMarker(dest string) *archiveMarker {
	data, err := os.ReadFile(e.markerFile(dest))
	if err != nil {
		return nil
	}
	var m archiveMarker
	if json.Unmarshal(data, &m) != nil || m.Path != dest {
		return nil
	}
	return &m
}

func (e *Executor) writeMarker(m *archiveMarker) error {
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	file := e.markerFile(m.Path)
	tmp, err := os.CreateTemp(filepath.Dir(file), ".marker-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), file)
}

// isURL tells a checksum given as a URL from one given as a value.
func isURL(s string) bool {
	return strings.HasPrefix(s, "http://") || strings.HasPrefix(s, "https://") || strings.HasPrefix(s, "s3://")
}

func checkSourceURL(param, raw string) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "s3") || u.Host == "" {
		return &badParam{param, fmt.Sprintf("must be an http, https or s3 URL (s3://bucket/key), got %q", redactURL(raw))}
	}
	if u.Scheme == "s3" && strings.Trim(u.Path, "/") == "" {
		return &badParam{param, fmt.Sprintf("%q names a bucket but no object: write s3://bucket/key", raw)}
	}
	return nil
}

// fetch writes what url holds to w, at most max bytes.
func (e *Executor) fetch(ctx context.Context, raw string, w io.Writer, max int64) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	var body io.ReadCloser
	if u.Scheme == "s3" {
		body, err = e.s3Get(ctx, u)
	} else {
		body, err = e.httpGet(ctx, raw)
	}
	if err != nil {
		return err
	}
	defer body.Close()
	n, err := io.Copy(w, io.LimitReader(body, max+1))
	if err != nil {
		return fmt.Errorf("downloading %s: %w", redactURL(raw), err)
	}
	if n > max {
		return fmt.Errorf("%s is larger than %d bytes", redactURL(raw), max)
	}
	return nil
}

func (e *Executor) httpGet(ctx context.Context, raw string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, raw, nil)
	if err != nil {
		return nil, err
	}
	// The client's own timeout suits a small file; an archive is bounded
	// by the state's context and archiveTimeout instead.
	client := *e.opts.HTTPClient
	client.Timeout = 0
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("downloading %s: %w", redactURL(raw), err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("downloading %s: HTTP %s", redactURL(raw), resp.Status)
	}
	return resp.Body, nil
}

// s3Get reads s3://bucket/key with the instance's credentials.
func (e *Executor) s3Get(ctx context.Context, u *url.URL) (io.ReadCloser, error) {
	o := e.opts.S3
	endpoint, err := url.Parse(o.Endpoint)
	if err != nil || endpoint.Host == "" {
		return nil, fmt.Errorf("the S3 endpoint %q is not a URL", o.Endpoint)
	}
	creds := o.Credentials
	if creds == nil {
		creds = credentials.NewChainCredentials([]credentials.Provider{
			&credentials.EnvAWS{},
			&credentials.FileAWSCredentials{},
			&credentials.IAM{Endpoint: o.MetadataURL, Client: &http.Client{Timeout: 10 * time.Second}},
		})
	}
	client, err := minio.New(endpoint.Host, &minio.Options{Creds: creds, Secure: endpoint.Scheme == "https", Region: o.Region, Transport: e.opts.HTTPClient.Transport})
	if err != nil {
		return nil, fmt.Errorf("S3 client for %s: %w", o.Endpoint, err)
	}
	bucket, key := u.Host, strings.TrimPrefix(u.Path, "/")
	obj, err := client.GetObject(ctx, bucket, key, minio.GetObjectOptions{})
	if err == nil {
		_, err = obj.Stat() // GetObject is lazy: the request happens here
	}
	if err != nil {
		if obj != nil {
			obj.Close()
		}
		resp := minio.ToErrorResponse(err)
		if resp.Code != "" {
			return nil, fmt.Errorf("reading s3://%s/%s: %s: %s (the instance's credentials: its IAM role, or AWS_ACCESS_KEY_ID / ~/.aws/credentials of the agent)", bucket, key, resp.Code, resp.Message)
		}
		return nil, fmt.Errorf("reading s3://%s/%s: %w", bucket, key, err)
	}
	return obj, nil
}

// checksum is an expected digest.
type checksum struct {
	algo string // md5, sha1, sha224, sha256, sha384, sha512
	hex  string // lower case
}

func (c *checksum) String() string {
	if c == nil {
		return ""
	}
	return c.algo + ":" + c.hex
}

func (c *checksum) newHash() hash.Hash {
	switch c.algo {
	case "md5":
		return md5.New()
	case "sha1":
		return sha1.New()
	case "sha224":
		return sha256.New224()
	case "sha256":
		return sha256.New()
	case "sha384":
		return sha512.New384()
	}
	return sha512.New()
}

// digestLen is the length in hex digits of each algorithm's digest.
var digestLen = map[string]int{"md5": 32, "sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128}

var hexDigits = regexp.MustCompile(`^[0-9a-fA-F]+$`)

// parseChecksum reads "md5:HEX" (the catalogue's form), "md5=HEX"
// (Salt's), the same with sha1, sha224, sha256, sha384 or sha512, or a
// bare digest whose length tells the algorithm.
func parseChecksum(v string) (checksum, error) {
	v = strings.TrimSpace(v)
	algo, digest := "", v
	if i := strings.IndexAny(v, ":="); i > 0 {
		algo, digest = strings.ToLower(strings.TrimSpace(v[:i])), strings.TrimSpace(v[i+1:])
	}
	if !hexDigits.MatchString(digest) {
		return checksum{}, fmt.Errorf("%q is not a checksum: write md5:HEX (or sha1, sha256, sha512: …), or the URL of a checksum file", v)
	}
	if algo == "" {
		for a, n := range digestLen {
			if n == len(digest) {
				algo = a
			}
		}
		if algo == "" {
			return checksum{}, fmt.Errorf("%q is not a digest of md5, sha1, sha224, sha256, sha384 or sha512 (wrong length %d)", v, len(digest))
		}
	}
	n, ok := digestLen[algo]
	if !ok {
		return checksum{}, fmt.Errorf("%q: unknown algorithm %q: use md5, sha1, sha224, sha256, sha384 or sha512", v, algo)
	}
	if len(digest) != n {
		return checksum{}, fmt.Errorf("%q: a %s digest has %d hex digits, this one %d", v, algo, n, len(digest))
	}
	return checksum{algo: algo, hex: strings.ToLower(digest)}, nil
}

var bsdLine = regexp.MustCompile(`^([A-Za-z0-9]+) ?\((.*)\) ?= ?([0-9a-fA-F]+)$`)

// fetchChecksum reads a checksum file: one digest, or md5sum/sha256sum
// lines ("HEX  name", "HEX *name") or BSD lines ("MD5 (name) = HEX"),
// where the line of the source's file name is taken.
func (e *Executor) fetchChecksum(ctx context.Context, raw, source string) (*checksum, error) {
	var buf bytes.Buffer
	if err := e.fetch(ctx, raw, &buf, maxChecksumFile); err != nil {
		return nil, fmt.Errorf("checksum: %w", err)
	}
	name := ""
	if u, err := url.Parse(source); err == nil {
		name = path.Base(u.Path)
	}
	type line struct {
		name string
		sum  checksum
	}
	var lines []line
	sc := bufio.NewScanner(&buf)
	for sc.Scan() {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		var l line
		var err error
		if m := bsdLine.FindStringSubmatch(text); m != nil {
			l.name = m[2]
			l.sum, err = parseChecksum(strings.ToLower(m[1]) + ":" + m[3])
		} else {
			fields := strings.Fields(text)
			l.sum, err = parseChecksum(fields[0])
			if len(fields) > 1 {
				l.name = strings.TrimPrefix(fields[len(fields)-1], "*")
			}
		}
		if err != nil {
			return nil, fmt.Errorf("checksum file %s: %w", redactURL(raw), err)
		}
		lines = append(lines, l)
	}
	switch {
	case len(lines) == 1:
		return &lines[0].sum, nil
	case len(lines) == 0:
		return nil, fmt.Errorf("checksum file %s holds no checksum", redactURL(raw))
	}
	for _, l := range lines {
		if path.Base(l.name) == name {
			return &l.sum, nil
		}
	}
	return nil, fmt.Errorf("checksum file %s lists %d files, none of them %s", redactURL(raw), len(lines), name)
}
