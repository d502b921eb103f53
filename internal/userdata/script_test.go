package userdata

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The ways the script is run: by hand as a file, piped into bash (as in
// `curl …/user-data | bash`: $0 is "bash", no file to re-read), and by
// cloud-init (an executable file, a bare environment).
var modes = []string{"file", "stdin", "pipe", "cloud-init"}

// releaseServer serves <version>/opsagent.tgz on loopback.
type releaseServer struct {
	*httptest.Server
	tgz       []byte
	failFirst int32         // answer 503 to this many requests first
	hold      chan struct{} // when set, answers wait until it is closed
	arrived   chan struct{} // gets a value per request that reaches hold
	requests  atomic.Int32
	userAgent atomic.Value // of the last request
}

func newReleaseServer(t *testing.T, version string, tgz []byte) *releaseServer {
	s := &releaseServer{tgz: tgz, arrived: make(chan struct{}, 100)}
	s.userAgent.Store("")
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/"+version+"/opsagent.tgz" {
			http.NotFound(w, r)
			return
		}
		s.userAgent.Store(r.UserAgent())
		if s.requests.Add(1) <= s.failFirst {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		if s.hold != nil {
			s.arrived <- struct{}{}
			select {
			case <-s.hold:
			case <-r.Context().Done():
				return
			}
		}
		_, _ = w.Write(s.tgz)
	}))
	t.Cleanup(s.Close)
	return s
}

// fixture is one bootstrap run's world, all below temporary directories.
type fixture struct {
	t      *testing.T
	root   string // OPSAGENT_ROOT
	record string // the fake `opsagent install` writes its arguments here
	tmpdir string // TMPDIR, which must stay empty
	pwned  string // exists only if the script executed a value
	srv    *releaseServer
	params Params
	env    map[string]string
}

// newFixture builds a release whose fake binaries record their arguments
// and exit with fakeExit, serves it, and renders values that would run
// commands if quoted wrongly.
func newFixture(t *testing.T, fakeExit int) *fixture {
	requireTool(t, "bash")
	if runtime.GOARCH != "amd64" && runtime.GOARCH != "arm64" {
		t.Skipf("the script installs on amd64 and arm64 only, this is %s", runtime.GOARCH)
	}
	f := &fixture{t: t, root: t.TempDir(), tmpdir: t.TempDir()}
	dir := t.TempDir()
	f.record, f.pwned = filepath.Join(dir, "install-args"), filepath.Join(dir, "pwned")
	// The fake notes its session first, then its arguments (what the
	// tests wait for).
	// It also notes the ENROLL_SECRET it got through its environment.
	fake := fmt.Sprintf("#!/bin/bash\nread -r -a st </proc/$$/stat\necho \"${st[5]}\" >%s\nprintf '%%s' \"${ENROLL_SECRET-(unset)}\" >%s\nprintf '%%s\\0' \"$@\" >%s\nexit %d\n",
		shellQuote(f.record+".sid"), shellQuote(f.record+".secret"), shellQuote(f.record), fakeExit)
	tgz := buildTarball(t, fake)
	f.srv = newReleaseServer(t, "2.1", tgz)
	sum := sha256.Sum256(tgz)
	evil := strings.Join([]string{everything, "$(touch " + f.pwned + ")", "`touch " + f.pwned + "`", "'$(touch " + f.pwned + ")'"}, " ")
	f.params = Params{
		WSURI: "wss://api.example.com/agent/?" + evil, AppID: "app-" + evil, Version: "2.1",
		BaseRemote: f.srv.URL, PubKey: evil, SHA256: hex.EncodeToString(sum[:]), EnrollSecret: evil,
		Set: []string{"salt.delay=5", "a.b=" + strings.ReplaceAll(evil, "\n", " ")},
	}
	f.env = map[string]string{
		"PATH": os.Getenv("PATH"), "OPSAGENT_ROOT": f.root, "TMPDIR": f.tmpdir,
		"OPSAGENT_FOREGROUND": "1", "OPSAGENT_MAX_TRIES": "5", "OPSAGENT_RETRY_MAX_DELAY": "0",
	}
	return f
}

// buildTarball makes a release tarball with fake for both binaries.
func buildTarball(t *testing.T, fake string) []byte {
	var buf bytes.Buffer
	gz := gzip.NewWriter(&buf)
	tw := tar.NewWriter(gz)
	for _, e := range []struct{ name, data string }{
		{"VERSION", "2.1\n"}, {"opsagent-linux-amd64", fake}, {"opsagent-linux-arm64", fake},
	} {
		if err := tw.WriteHeader(&tar.Header{Name: e.name, Mode: 0o755, Size: int64(len(e.data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.data)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gz.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// run renders the script and runs it in mode; it returns the exit status
// and stderr.
func (f *fixture) run(mode string) (int, string) {
	t := f.t
	t.Helper()
	file := writeScript(t, f.params)
	var env []string
	for k, v := range f.env {
		env = append(env, k+"="+v)
	}
	slices.Sort(env)
	var cmd *exec.Cmd
	switch mode {
	case "file":
		cmd = exec.Command("bash", file)
	case "stdin":
		cmd = exec.Command("bash")
		in, err := os.Open(file)
		if err != nil {
			t.Fatal(err)
		}
		defer in.Close()
		cmd.Stdin = in
	case "pipe":
		cmd = exec.Command("bash", "-c", `cat "$1" | bash`, "_", file)
	case "cloud-init":
		bare := slices.DeleteFunc(slices.Clone(env), func(s string) bool { return strings.HasPrefix(s, "PATH=") })
		cmd = exec.Command("env", append(append([]string{"-i", "PATH=/usr/bin:/bin"}, bare...), "./"+filepath.Base(file))...)
		cmd.Dir = filepath.Dir(file)
	default:
		t.Fatalf("unknown mode %q", mode)
	}
	if mode != "cloud-init" {
		cmd.Env = env
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	// A script that did not detach its output would hold these pipes open.
	cmd.WaitDelay = 30 * time.Second
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		return exit.ExitCode(), stderr.String()
	case err != nil:
		t.Fatalf("%s: %v\nstderr:\n%s", mode, err, stderr.String())
	}
	return 0, stderr.String()
}

func (f *fixture) wantArgs() []string {
	p := f.params
	args := []string{"install", "--ws-uri", p.WSURI, "--app-id", p.AppID, "--version", p.Version,
		"--base-remote", p.BaseRemote, "--root", f.root, "--start", "--pubkey", p.PubKey}
	for _, s := range p.Set {
		args = append(args, "--set", s)
	}
	return args
}

// installArgs returns what the fake install recorded; nil when it did not
// run.
func (f *fixture) installArgs() []string {
	data, err := os.ReadFile(f.record)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		f.t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(data), "\x00"), "\x00")
}

// installSession is the session id the fake install ran in.
func (f *fixture) installSession() string {
	data, err := os.ReadFile(f.record + ".sid")
	if err != nil {
		f.t.Fatal(err)
	}
	return strings.TrimSpace(string(data))
}

// sessionOf reads the session id from a /proc/<pid>/stat file: the fourth
// field after the command name.
func sessionOf(t *testing.T, statFile string) string {
	data, err := os.ReadFile(statFile)
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(data), ") ")
	if fields := strings.Fields(rest); len(fields) > 3 {
		return fields[3]
	}
	t.Fatalf("%s: %q has no session field", statFile, data)
	return ""
}

func (f *fixture) log() string {
	data, err := os.ReadFile(filepath.Join(f.root, "var/log/visualops/bootstrap.log"))
	if err != nil {
		f.t.Fatalf("bootstrap log: %v", err)
	}
	return string(data)
}

var logLine = regexp.MustCompile(`(?m)^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z opsagent-bootstrap: (.*)$`)

// checkLog wants every step in the log on a timestamped line, in a 0750
// directory.
func (f *fixture) checkLog(steps ...string) {
	t := f.t
	t.Helper()
	log := f.log()
	var lines []string
	for _, m := range logLine.FindAllStringSubmatch(log, -1) {
		lines = append(lines, m[1])
	}
	for _, step := range steps {
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.Contains(l, step) }) {
			t.Errorf("no timestamped log line with %q in:\n%s", step, log)
		}
	}
	fi, err := os.Stat(filepath.Join(f.root, "var/log/visualops"))
	if err != nil || fi.Mode().Perm() != 0o750 {
		t.Errorf("log directory: %v, %v; want mode 0750", fi, err)
	}
}

// checkClean wants no temporary file left, no value executed, and nothing
// below the root but the log (and the empty parent of temporary
// directories).
func (f *fixture) checkClean() {
	t := f.t
	t.Helper()
	if _, err := os.Stat(f.pwned); err == nil {
		t.Errorf("a value was executed as a command: %s exists", f.pwned)
	}
	var files []string
	for _, dir := range []string{f.root, f.tmpdir} {
		_ = filepath.WalkDir(dir, func(path string, _ os.DirEntry, err error) error {
			if err == nil {
				files = append(files, path)
			}
			return err
		})
	}
	want := []string{f.root, f.root + "/var", f.root + "/var/log", f.root + "/var/log/visualops",
		f.root + "/var/log/visualops/bootstrap.log", f.tmpdir}
	slices.Sort(files)
	slices.Sort(want)
	if !slices.Equal(files, want) {
		t.Errorf("files left:\n%s\nwant:\n%s", strings.Join(files, "\n"), strings.Join(want, "\n"))
	}
}

func (f *fixture) checkInstalled() {
	f.t.Helper()
	if got, want := f.installArgs(), f.wantArgs(); !slices.Equal(got, want) {
		f.t.Errorf("install ran with\n%q\nwant\n%q", got, want)
	}
	if got, _ := os.ReadFile(f.record + ".secret"); string(got) != f.params.EnrollSecret {
		f.t.Errorf("install got ENROLL_SECRET %q in its environment, want %q", got, f.params.EnrollSecret)
	}
}

// A good release installs, with every hostile value intact, however the
// script is run.
func TestRunInstalls(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			f := newFixture(t, 0)
			code, stderr := f.run(mode)
			if code != 0 {
				t.Fatalf("exit %d; stderr:\n%s", code, stderr)
			}
			f.checkInstalled()
			f.checkLog("starting", "downloading "+f.srv.URL+"/2.1/opsagent.tgz", "SHA-256 "+f.params.SHA256+" verified",
				"running opsagent install", "opsagent install succeeded")
			f.checkClean()
			if !strings.Contains(stderr, "opsagent install succeeded") {
				t.Errorf("in the foreground the log goes to stderr too; stderr:\n%s", stderr)
			}
			if ua := f.srv.userAgent.Load().(string); !strings.HasPrefix(ua, "curl/") {
				t.Errorf("downloaded by %q, want curl", ua)
			}
		})
	}
}

func TestRunRefusesBadChecksum(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			f := newFixture(t, 0)
			f.params.SHA256 = strings.Repeat("0", 64)
			code, stderr := f.run(mode)
			if code != 1 {
				t.Errorf("exit %d, want 1; stderr:\n%s", code, stderr)
			}
			if args := f.installArgs(); args != nil {
				t.Errorf("install ran: %q", args)
			}
			f.checkLog("checksum mismatch for " + f.srv.URL + "/2.1/opsagent.tgz")
			f.checkClean()
		})
	}
}

func TestRunRetries(t *testing.T) {
	f := newFixture(t, 0)
	f.srv.failFirst = 2
	f.env["OPSAGENT_RETRY_MAX_DELAY"] = "1"
	if code, stderr := f.run("file"); code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", code, stderr)
	}
	f.checkInstalled()
	f.checkLog("failed (try 1); retrying in 1s", "failed (try 2); retrying in 1s", "opsagent install succeeded")
	f.checkClean()
	if n := f.srv.requests.Load(); n != 3 {
		t.Errorf("%d requests, want 3", n)
	}
}

func TestRunGivesUpAfterMaxTries(t *testing.T) {
	f := newFixture(t, 0)
	f.srv.failFirst = 1000
	f.env["OPSAGENT_MAX_TRIES"] = "2"
	if code, _ := f.run("file"); code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	f.checkLog("failed 2 times; giving up (OPSAGENT_MAX_TRIES=2)")
	f.checkClean()
	if n := f.srv.requests.Load(); n != 2 {
		t.Errorf("%d requests, want 2", n)
	}
}

func TestRunReportsInstallFailure(t *testing.T) {
	f := newFixture(t, 3)
	if code, _ := f.run("file"); code != 3 {
		t.Errorf("exit %d, want install's 3", code)
	}
	f.checkInstalled()
	f.checkLog("opsagent install failed (exit 3)")
	f.checkClean()
}

// Without OPSAGENT_FOREGROUND the script returns at once and installs in
// the background: the command ends while the server still holds the
// download, and the install happens after the server lets it go.
func TestRunDetaches(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			f := newFixture(t, 0)
			delete(f.env, "OPSAGENT_FOREGROUND")
			f.srv.hold = make(chan struct{})
			var release sync.Once
			t.Cleanup(func() { release.Do(func() { close(f.srv.hold) }) })

			code, stderr := f.run(mode)
			if code != 0 {
				t.Fatalf("exit %d; stderr:\n%s", code, stderr)
			}
			if !strings.Contains(stderr, "continuing in the background") {
				t.Errorf("stderr:\n%s", stderr)
			}
			select {
			case <-f.srv.arrived:
			case <-time.After(60 * time.Second):
				t.Fatalf("the background part never asked for the release; log:\n%s", f.log())
			}
			if args := f.installArgs(); args != nil {
				t.Fatalf("installed before the download finished: %q", args)
			}
			release.Do(func() { close(f.srv.hold) })
			waitFor(t, "the background install to finish and clean up", func() bool {
				return f.installArgs() != nil && strings.Contains(f.log(), "opsagent install succeeded") &&
					noBootstrapDir(f.root)
			})
			f.checkInstalled()
			f.checkLog("continuing in the background", "downloading", "opsagent install succeeded")
			f.checkClean()
			if _, err := exec.LookPath("setsid"); err == nil && f.installSession() == sessionOf(t, "/proc/self/stat") {
				t.Errorf("install ran in the caller's session %s; want a session of its own (setsid)", f.installSession())
			}
		})
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// noBootstrapDir reports that the script's temporary directory, and the
// directories made for it, are gone (the fake install creates none).
func noBootstrapDir(root string) bool {
	_, err := os.Stat(filepath.Join(root, "opt"))
	return os.IsNotExist(err)
}

// toolsWithout makes a PATH directory holding the commands the script
// needs, except those named, so that the fallbacks run.
func toolsWithout(t *testing.T, missing ...string) string {
	dir := t.TempDir()
	for _, name := range []string{"cat", "chmod", "curl", "date", "gzip", "mkdir", "mktemp", "nohup", "openssl",
		"rm", "rmdir", "setsid", "sha256sum", "sleep", "tar", "tee", "uname", "wget"} {
		if slices.Contains(missing, name) {
			continue
		}
		if path, err := exec.LookPath(name); err == nil {
			if err := os.Symlink(path, filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	return dir
}

func TestRunFallsBackToWgetAndOpenssl(t *testing.T) {
	requireTool(t, "wget")
	requireTool(t, "openssl")
	f := newFixture(t, 0)
	f.env["PATH"] = toolsWithout(t, "curl", "sha256sum")
	if code, stderr := f.run("file"); code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", code, stderr)
	}
	f.checkInstalled()
	f.checkLog("SHA-256 " + f.params.SHA256 + " verified")
	f.checkClean()
	if ua := f.srv.userAgent.Load().(string); !strings.HasPrefix(ua, "Wget/") {
		t.Errorf("downloaded by %q, want wget", ua)
	}

	g := newFixture(t, 0)
	g.env["PATH"] = f.env["PATH"]
	g.params.SHA256 = strings.Repeat("f", 64)
	if code, _ := g.run("file"); code != 1 {
		t.Errorf("bad checksum through openssl: exit %d, want 1", code)
	}
	g.checkLog("checksum mismatch")
	if args := g.installArgs(); args != nil {
		t.Errorf("install ran: %q", args)
	}
}

func TestRunWithoutChecksumInstalls(t *testing.T) {
	f := newFixture(t, 0)
	f.params.SHA256 = ""
	if code, stderr := f.run("file"); code != 0 {
		t.Fatalf("exit %d; stderr:\n%s", code, stderr)
	}
	f.checkInstalled()
	f.checkLog("no SHA256 in this script: not checking")
}

func TestRunRefuses(t *testing.T) {
	t.Run("no downloader", func(t *testing.T) {
		f := newFixture(t, 0)
		f.env["PATH"] = toolsWithout(t, "curl", "wget")
		if code, _ := f.run("file"); code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		f.checkLog("neither curl nor wget is installed")
		f.checkClean()
	})
	t.Run("unsupported architecture", func(t *testing.T) {
		f := newFixture(t, 0)
		dir := toolsWithout(t, "uname")
		if err := os.WriteFile(filepath.Join(dir, "uname"), []byte("#!/bin/bash\necho sparc64\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		f.env["PATH"] = dir
		if code, _ := f.run("file"); code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		f.checkLog("unsupported architecture sparc64")
		if n := f.srv.requests.Load(); n != 0 {
			t.Errorf("%d downloads for an unsupported machine", n)
		}
	})
}

// recordingTools makes a PATH directory in which every command the script
// runs is a wrapper that appends its argv (NUL-separated, a newline after
// each command) to log and then runs the real command.
func recordingTools(t *testing.T, log string) string {
	dir := t.TempDir()
	for _, name := range []string{"cat", "chmod", "curl", "date", "gzip", "mkdir", "mktemp", "nohup", "openssl",
		"rm", "rmdir", "setsid", "sha256sum", "sleep", "tar", "tee", "uname", "wget"} {
		real, err := exec.LookPath(name)
		if err != nil {
			continue
		}
		wrapper := fmt.Sprintf("#!/bin/bash\nprintf '%%s\\0' %s \"$@\" >>%s\necho >>%s\nexec %s \"$@\"\n",
			shellQuote(name), shellQuote(log), shellQuote(log), shellQuote(real))
		if err := os.WriteFile(filepath.Join(dir, name), []byte(wrapper), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// The enrollment secret never appears in a process's arguments (which
// every local user sees in ps) nor in bootstrap.log: install gets it
// through its environment.
func TestSecretNeverInArgv(t *testing.T) {
	for _, mode := range []string{"file", "pipe"} {
		t.Run(mode, func(t *testing.T) {
			f := newFixture(t, 0)
			f.params.EnrollSecret = "es-7f3c9b2a-$(id)-'quoted' \\ end"
			argvLog := filepath.Join(t.TempDir(), "argv")
			f.env["PATH"] = recordingTools(t, argvLog) + ":" + f.env["PATH"]
			if mode == "pipe" {
				// Detached, as at boot: the background part runs the work.
				delete(f.env, "OPSAGENT_FOREGROUND")
			}
			code, stderr := f.run(mode)
			if code != 0 {
				t.Fatalf("exit %d; stderr:\n%s", code, stderr)
			}
			waitFor(t, "the install to finish", func() bool { return strings.Contains(f.log(), "opsagent install succeeded") })
			f.checkInstalled()
			for _, a := range f.installArgs() {
				if strings.Contains(a, f.params.EnrollSecret) {
					t.Errorf("install's argv carries the secret: %q", f.installArgs())
				}
			}
			recorded, err := os.ReadFile(argvLog)
			if err != nil || !strings.Contains(string(recorded), "curl") && !strings.Contains(string(recorded), "wget") {
				t.Fatalf("the wrappers recorded nothing (%v): %q", err, recorded)
			}
			if strings.Contains(string(recorded), f.params.EnrollSecret) {
				t.Errorf("a command's argv carries the secret:\n%q", recorded)
			}
			if strings.Contains(f.log(), f.params.EnrollSecret) || strings.Contains(stderr, f.params.EnrollSecret) {
				t.Errorf("the secret was logged:\n%s", f.log())
			}
		})
	}
}

// A symlink where the script writes its log, or downloads, stops it
// before it writes anything through the link.
func TestRunRefusesLinks(t *testing.T) {
	for _, p := range []string{"var/log/visualops", "var/log/visualops/bootstrap.log", "var/log", "opt/visualops"} {
		t.Run(p, func(t *testing.T) {
			f := newFixture(t, 0)
			outside := t.TempDir()
			victim := filepath.Join(outside, "bootstrap.log")
			if err := os.WriteFile(victim, []byte("precious\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			target := outside
			if strings.HasSuffix(p, ".log") {
				target = victim
			}
			link := filepath.Join(f.root, p)
			if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(target, link); err != nil {
				t.Fatal(err)
			}
			code, stderr := f.run("file")
			if code != 1 || !strings.Contains(stderr, link+" is a symbolic link") {
				t.Errorf("exit %d, stderr:\n%s", code, stderr)
			}
			if args := f.installArgs(); args != nil {
				t.Errorf("install ran: %q", args)
			}
			if data, _ := os.ReadFile(victim); string(data) != "precious\n" {
				t.Errorf("written through the link: %q", data)
			}
			if fi, _ := os.Stat(outside); fi.Mode().Perm() != 0o700 && fi.Mode().Perm() != 0o755 {
				t.Errorf("the directory outside was chmodded to %04o", fi.Mode().Perm())
			}
			entries, _ := os.ReadDir(outside)
			if len(entries) != 1 {
				t.Errorf("%d entries outside, want 1", len(entries))
			}
		})
	}
}
