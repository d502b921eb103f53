package updater

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"aead.dev/minisign"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/service"
	"github.com/visualops/opsagent/internal/updatephase"
)

// fakeBinary is a shell script that answers `version --json` like opsagent.
func fakeBinary(version string) []byte {
	return []byte(fmt.Sprintf("#!/bin/sh\necho '{\"version\":\"%s\"}'\n", version))
}

type key struct {
	pub  string
	priv minisign.PrivateKey
}

func newKey(t *testing.T) key {
	t.Helper()
	dir := t.TempDir()
	pub, err := dist.Keygen(dir, "", true)
	if err != nil {
		t.Fatal(err)
	}
	priv, err := dist.LoadSecretKey(filepath.Join(dir, dist.SecretKeyFile), "")
	if err != nil {
		t.Fatal(err)
	}
	return key{pub: pub, priv: priv}
}

// release builds opsagent.tgz with the given entries (VERSION and this
// architecture's binary unless overridden) and its signature.
func release(t *testing.T, version string, k key, entries ...archive.Entry) (tgz, sig []byte) {
	t.Helper()
	if entries == nil {
		entries = []archive.Entry{
			{Name: "VERSION", Mode: 0o644, Data: []byte(version + "\n")},
			{Name: dist.BinaryName(runtime.GOARCH), Mode: 0o755, Data: fakeBinary(version)},
		}
	}
	var buf bytes.Buffer
	if err := archive.Create(context.Background(), &buf, entries, time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), dist.Sign(k.priv, buf.Bytes(), "version:"+version)
}

// bucket serves releases like the S3 bucket: <version>/opsagent.tgz and
// .minisig, with Range support; hooks change a response.
type bucket struct {
	srv    *httptest.Server
	mu     sync.Mutex
	files  map[string][]byte
	hook   func(w http.ResponseWriter, r *http.Request) bool // true: handled
	ranged atomic.Int64
}

func newBucket(t *testing.T) *bucket {
	b := &bucket{files: map[string][]byte{}}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") != "" {
			b.ranged.Add(1)
		}
		b.mu.Lock()
		hook := b.hook
		data, ok := b.files[strings.TrimPrefix(r.URL.Path, "/")]
		b.mu.Unlock()
		if hook != nil && hook(w, r) {
			return
		}
		if !ok {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, "f", time.Unix(0, 0), bytes.NewReader(data))
	}))
	t.Cleanup(b.srv.Close)
	return b
}

// publish puts a release of version (with the given entries, default the
// usual ones) under the path of dir, signed with k.
func (r *rig) publish(dir, version string, k key, entries ...archive.Entry) {
	r.t.Helper()
	tgz, sig := release(r.t, version, k, entries...)
	r.b.put(dir, tgz, sig)
}

func (b *bucket) put(version string, tgz, sig []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.files[version+"/"+dist.TarballName] = tgz
	if sig != nil {
		b.files[version+"/"+dist.SignatureName] = sig
	}
}

type rig struct {
	t      *testing.T
	layout config.Layout
	b      *bucket
	key    key
	src    Source
	steps  []Step
	mu     sync.Mutex
	before []byte
}

func newRig(t *testing.T) *rig {
	t.Helper()
	root, _ := fsutil.NewRoot(t.TempDir())
	r := &rig{t: t, b: newBucket(t), key: newKey(t)}
	r.src = Source{BaseRemote: r.b.srv.URL, TrustedKeys: []string{r.key.pub}}
	r.layout = config.NewLayout(root, "", nil)
	for _, d := range []string{r.layout.BinDir(), r.layout.StateDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	r.before = fakeBinary("1.0.0")
	if err := os.WriteFile(r.layout.Binary(), r.before, 0o755); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *rig) updater(tweak func(*Options)) *Updater {
	o := Options{Layout: r.layout, Current: "1.0.0", Target: r.layout.Binary(), Source: func() Source { return r.src },
		NoWatchdog: true, Retries: 3, RetryDelay: time.Millisecond, OnStep: func(s Step) { r.mu.Lock(); r.steps = append(r.steps, s); r.mu.Unlock() }}
	if tweak != nil {
		tweak(&o)
	}
	return New(o)
}

// unchanged fails the test unless the installed binary is as before and
// nothing of the attempt is left.
func (r *rig) unchanged() {
	r.t.Helper()
	if data, _ := os.ReadFile(r.layout.Binary()); !bytes.Equal(data, r.before) {
		r.t.Error("the running binary changed")
	}
	for _, p := range []string{r.layout.OldBinary(), stagedBinary(r.layout.Binary()), filepath.Join(r.layout.DownloadDir(), dist.TarballName+".unverified")} {
		if _, err := os.Stat(p); err == nil {
			r.t.Errorf("%s left behind", p)
		}
	}
}

func TestUpdateSwapsKeepsOldAndRecordsConfirming(t *testing.T) {
	r := newRig(t)
	tgz, sig := release(t, "2.0.0", r.key)
	r.b.put("2.0.0", tgz, sig)
	restart, err := r.updater(func(o *Options) { o.HealthTimeout = time.Minute }).Do(context.Background(), Request{Version: "2.0.0"})
	if err != nil {
		t.Fatal(err)
	}
	if restart.Binary != r.layout.Binary() || restart.Version != "2.0.0" {
		t.Errorf("restart %+v", restart)
	}
	if data, _ := os.ReadFile(r.layout.Binary()); !bytes.Equal(data, fakeBinary("2.0.0")) {
		t.Error("not swapped")
	}
	if data, _ := os.ReadFile(r.layout.OldBinary()); !bytes.Equal(data, r.before) {
		t.Error("opsagent.old is not the previous binary")
	}
	st, err := service.ReadUpdateState(r.layout.UpdateStateFile())
	if err != nil || st.Phase != updatephase.Confirming || st.From != "1.0.0" || st.To != "2.0.0" || time.Until(st.Deadline) > time.Minute+time.Second {
		t.Errorf("update state %+v %v", st, err)
	}
	var phases []string
	for _, s := range r.steps {
		if len(phases) == 0 || phases[len(phases)-1] != string(s.Phase) {
			phases = append(phases, string(s.Phase))
		}
	}
	if got := strings.Join(phases, ","); got != "downloading,verifying,extracting,smoke-testing,ready,swapping,confirming" {
		t.Errorf("steps %s", got)
	}
	if _, err := os.Stat(filepath.Join(r.layout.DownloadDir(), dist.TarballName+".unverified")); err == nil {
		t.Error("the download was left behind")
	}
}

// Every refusal leaves the running binary byte for byte unchanged and
// says why in one line.
func TestRefusals(t *testing.T) {
	other := newKey(t)
	cases := []struct {
		name  string
		setup func(r *rig) Request
		tweak func(*Options)
		want  string
	}{
		{"bad signature", func(r *rig) Request {
			tgz, sig := release(t, "2.0.0", r.key)
			tgz = append(append([]byte{}, tgz...), 0) // altered after signing
			r.b.put("2.0.0", tgz, sig)
			return Request{Version: "2.0.0"}
		}, nil, "signature"},
		{"missing signature", func(r *rig) Request {
			tgz, _ := release(t, "2.0.0", r.key)
			r.b.put("2.0.0", tgz, nil)
			return Request{Version: "2.0.0"}
		}, nil, "no signature"},
		{"wrong key", func(r *rig) Request {
			r.publish("2.0.0", "2.0.0", other)
			return Request{Version: "2.0.0"}
		}, nil, "signature check failed"},
		{"no trusted key", func(r *rig) Request {
			r.src.TrustedKeys = []string{""}
			r.publish("2.0.0", "2.0.0", r.key)
			return Request{Version: "2.0.0"}
		}, nil, "no trusted key"},
		{"truncated download", func(r *rig) Request {
			tgz, sig := release(t, "2.0.0", r.key)
			r.b.put("2.0.0", tgz, sig)
			r.b.hook = func(w http.ResponseWriter, req *http.Request) bool {
				if strings.HasSuffix(req.URL.Path, ".tgz") {
					w.Header().Set("Content-Length", fmt.Sprint(len(tgz)))
					w.WriteHeader(http.StatusOK)
					w.Write(tgz[:len(tgz)/2]) // and hang up
					return true
				}
				return false
			}
			return Request{Version: "2.0.0"}
		}, nil, "failed after 3 attempts"},
		{"oversized", func(r *rig) Request {
			r.publish("2.0.0", "2.0.0", r.key)
			return Request{Version: "2.0.0"}
		}, func(o *Options) { o.MaxDownload = 64 }, "over the 64-byte limit"},
		{"version mismatch", func(r *rig) Request {
			tgz, sig := release(t, "2.0.0", r.key)
			r.b.put("2.1.0", tgz, sig)
			return Request{Version: "2.1.0"}
		}, nil, "the tarball says VERSION 2.0.0"},
		{"downgrade", func(r *rig) Request {
			r.publish("0.9.0", "0.9.0", r.key)
			return Request{Version: "0.9.0"}
		}, nil, "not newer"},
		{"same version", func(r *rig) Request {
			return Request{Version: "1.0.0"}
		}, nil, "not newer"},
		{"smoke test fails", func(r *rig) Request {
			r.publish("2.0.0", "2.0.0", r.key,
				archive.Entry{Name: "VERSION", Mode: 0o644, Data: []byte("2.0.0\n")},
				archive.Entry{Name: dist.BinaryName(runtime.GOARCH), Mode: 0o755, Data: []byte("#!/bin/sh\necho 'exec format error' >&2\nexit 126\n")},
			)
			return Request{Version: "2.0.0"}
		}, nil, "does not run"},
		{"binary claims another version", func(r *rig) Request {
			r.publish("2.0.0", "2.0.0", r.key,
				archive.Entry{Name: "VERSION", Mode: 0o644, Data: []byte("2.0.0\n")},
				archive.Entry{Name: dist.BinaryName(runtime.GOARCH), Mode: 0o755, Data: fakeBinary("1.5.0")},
			)
			return Request{Version: "2.0.0"}
		}, nil, `says it is version "1.5.0"`},
		{"rolled back here before", func(r *rig) Request {
			r.publish("2.0.0", "2.0.0", r.key)
			if err := service.WriteUpdateState(r.layout.UpdateStateFile(), service.UpdateState{
				Phase: updatephase.RolledBack, From: "1.0.0", To: "2.0.0", Reason: "the new version 2.0.0 exited 3 times at start"}); err != nil {
				t.Fatal(err)
			}
			return Request{Version: "2.0.0"}
		}, nil, "it was rolled back here (the new version 2.0.0 exited 3 times at start)"},
		{"no binary for this architecture", func(r *rig) Request {
			r.publish("2.0.0", "2.0.0", r.key,
				archive.Entry{Name: "VERSION", Mode: 0o644, Data: []byte("2.0.0\n")},
				archive.Entry{Name: "opsagent-linux-s390x", Mode: 0o755, Data: fakeBinary("2.0.0")},
			)
			return Request{Version: "2.0.0"}
		}, nil, dist.BinaryName(runtime.GOARCH)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			req := tc.setup(r)
			_, err := r.updater(tc.tweak).Do(context.Background(), req)
			var refusal *Refusal
			if !errors.As(err, &refusal) || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("err = %v, want a one-line refusal containing %q", err, tc.want)
			}
			r.unchanged()
		})
	}
}

// Hostile archives (signed: a compromised or careless release) are
// refused by the extractor, before anything is swapped.
func TestHostileTarballsRefused(t *testing.T) {
	bin := dist.BinaryName(runtime.GOARCH)
	for name, hdrs := range map[string][]tarEntry{
		"dot-dot entry":  {{name: "VERSION", data: "2.0.0\n"}, {name: "../" + bin, data: "x"}, {name: bin, data: string(fakeBinary("2.0.0"))}},
		"symlink escape": {{name: "VERSION", data: "2.0.0\n"}, {name: bin, link: "/etc/passwd"}},
		"absolute path":  {{name: "VERSION", data: "2.0.0\n"}, {name: "/tmp/" + bin, data: "x"}},
	} {
		t.Run(name, func(t *testing.T) {
			r := newRig(t)
			tgz := rawTarGz(t, hdrs)
			r.b.put("2.0.0", tgz, dist.Sign(r.key.priv, tgz, "x"))
			_, err := r.updater(nil).Do(context.Background(), Request{Version: "2.0.0"})
			var refusal *Refusal
			if !errors.As(err, &refusal) {
				t.Fatalf("err = %v", err)
			}
			r.unchanged()
		})
	}
}

// A download cut short resumes with a Range request.
func TestDownloadResumes(t *testing.T) {
	r := newRig(t)
	tgz, sig := release(t, "2.0.0", r.key)
	r.b.put("2.0.0", tgz, sig)
	var cut atomic.Bool
	r.b.hook = func(w http.ResponseWriter, req *http.Request) bool {
		if strings.HasSuffix(req.URL.Path, ".tgz") && !cut.Swap(true) {
			w.Header().Set("Content-Length", fmt.Sprint(len(tgz)))
			w.WriteHeader(http.StatusOK)
			w.Write(tgz[:len(tgz)/3])
			return true
		}
		return false
	}
	if _, err := r.updater(nil).Do(context.Background(), Request{Version: "2.0.0"}); err != nil {
		t.Fatal(err)
	}
	if r.b.ranged.Load() == 0 {
		t.Error("the retry did not ask for the rest with a Range request")
	}
}

// By hand: --force allows a downgrade, --insecure-skip-signature an
// unsigned release.
func TestForceAndSkipSignatureByHand(t *testing.T) {
	r := newRig(t)
	r.publish("0.9.0", "0.9.0", r.key)
	if _, err := r.updater(nil).Do(context.Background(), Request{Version: "0.9.0", Force: true}); err != nil {
		t.Fatalf("forced downgrade: %v", err)
	}
	r2 := newRig(t)
	tgz, _ := release(t, "2.0.0", r2.key)
	r2.b.put("2.0.0", tgz, nil)
	r2.src.TrustedKeys = []string{""}
	if _, err := r2.updater(nil).Do(context.Background(), Request{Version: "2.0.0", InsecureSkipSignature: true}); err != nil {
		t.Fatalf("unsigned by hand: %v", err)
	}
}

// The key compiled into the binary is trusted besides [userdata] pubkey.
func TestEmbeddedKeyTrusted(t *testing.T) {
	r := newRig(t)
	r.src.TrustedKeys = []string{""}
	r.publish("2.0.0", "2.0.0", r.key)
	if _, err := r.updater(func(o *Options) { o.EmbeddedKey = r.key.pub }).Do(context.Background(), Request{Version: "2.0.0"}); err != nil {
		t.Fatal(err)
	}
}

type tarEntry struct{ name, data, link string }

// rawTarGz writes a tar.gz by hand, with names the project's Create would
// refuse.
func rawTarGz(t *testing.T, entries []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Mode: 0o755, Size: int64(len(e.data)), Typeflag: tar.TypeReg}
		if e.link != "" {
			h.Typeflag, h.Linkname, h.Size = tar.TypeSymlink, e.link, 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.link == "" {
			tw.Write([]byte(e.data))
		}
	}
	tw.Close()
	gz.Close()
	return buf.Bytes()
}

// A link planted where the updater writes (the download, resumed from an
// earlier run's partial file; the binary staged for the swap, under its
// name now and the name it had before) is refused with its name and
// never written through.
func TestPrepareNeverWritesThroughALink(t *testing.T) {
	for _, tc := range []struct {
		name  string
		plant func(r *rig, url, victim string) []string // the links planted
	}{
		{"resumed download", func(r *rig, url, victim string) []string {
			tarball := partialPath(r)
			if err := os.MkdirAll(filepath.Dir(tarball), 0o700); err != nil {
				t.Fatal(err)
			}
			meta, _ := json.Marshal(partialMeta{URL: url})
			if err := os.WriteFile(metaPath(tarball), meta, 0o600); err != nil {
				t.Fatal(err)
			}
			return []string{tarball}
		}},
		{"staged binary", func(r *rig, _, _ string) []string {
			return []string{stagedBinary(r.layout.Binary()), r.layout.Binary() + ".new"}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			r.publish("2.0.0", "2.0.0", r.key)
			victim := filepath.Join(t.TempDir(), "victim")
			if err := os.WriteFile(victim, []byte("someone else's\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			links := tc.plant(r, r.b.srv.URL+"/2.0.0/"+dist.TarballName, victim)
			for _, l := range links {
				if err := os.Symlink(victim, l); err != nil {
					t.Fatal(err)
				}
			}
			_, err := r.updater(nil).Prepare(context.Background(), Request{Version: "2.0.0"})
			if data, _ := os.ReadFile(victim); string(data) != "someone else's\n" {
				t.Errorf("the update wrote %d bytes through a link", len(data))
			}
			if err == nil || !strings.Contains(err.Error(), links[0]) || !strings.Contains(err.Error(), "symbolic link") {
				t.Errorf("Prepare: %v; want a refusal naming the link %s", err, links[0])
			}
		})
	}
}

// The smoke test reads the new binary's standard output alone
// (version.Query, as the installer asks): a release that prints a warning
// on standard error is not refused for it.
func TestSmokeTestReadsStandardOutput(t *testing.T) {
	r := newRig(t)
	r.publish("2.0.0", "2.0.0", r.key,
		archive.Entry{Name: "VERSION", Mode: 0o644, Data: []byte("2.0.0\n")},
		archive.Entry{Name: dist.BinaryName(runtime.GOARCH), Mode: 0o755, Data: []byte("#!/bin/sh\necho 'warning: GODEBUG setting ignored' >&2\necho '{\"version\":\"2.0.0\"}'\n")},
	)
	if _, err := r.updater(nil).Do(context.Background(), Request{Version: "2.0.0"}); err != nil {
		t.Fatalf("a release that warns on stderr: %v", err)
	}
}
