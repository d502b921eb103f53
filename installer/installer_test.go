package installer

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/testutil/imds"
)

var testParams = Params{WSURI: "ws://127.0.0.1:1/agent/", AppID: "app-i", Version: "1.0.0", BaseRemote: "http://127.0.0.1:1"}

// nativeSets keep these tests off the virtualenv (TestInstallBuildsTheVirtualenv covers it).
var nativeSets = []string{"network.instance_id=i-inst0001", "network.metadata=http://127.0.0.1:1", "agent.engine=native"}

type rig struct {
	t    *testing.T
	root fsutil.Root
	self string
	out  bytes.Buffer
}

func newRig(t *testing.T) *rig {
	t.Helper()
	dir := t.TempDir()
	root, _ := fsutil.NewRoot(filepath.Join(dir, "root"))
	self := filepath.Join(dir, "opsagent-build")
	if err := os.WriteFile(self, []byte("#!/bin/sh\necho fake opsagent\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return &rig{t: t, root: root, self: self}
}

func (r *rig) install(tweak func(*Options)) (*Result, error) {
	r.out.Reset()
	o := Options{Root: r.root, Flags: testParams, Sets: nativeSets, Self: r.self, Out: &r.out}
	if tweak != nil {
		tweak(&o)
	}
	return Install(context.Background(), o)
}

func (r *rig) layout() config.Layout { return config.NewLayout(r.root, "", nil) }

// fakeBinary is a stand-in agent that answers `version --json` as
// version v.
func fakeBinary(v string) []byte {
	return []byte("#!/bin/sh\nif [ \"$1 $2\" = 'version --json' ]; then echo '{\"version\":\"" + v + "\"}'; exit 0; fi\necho opsagent " + v + "\n")
}

func mode(t *testing.T, p string) fs.FileMode {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

// snapshot is every file below root with its content and mtime, but the
// logs (which a re-run appends to).
func snapshot(t *testing.T, root string) map[string]string {
	out := map[string]string{}
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || strings.Contains(p, "/var/log/") {
			return nil
		}
		st, _ := os.Lstat(p)
		data := ""
		if st.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			data = string(b)
		}
		out[p] = st.ModTime().String() + st.Mode().String() + data
		return nil
	})
	return out
}

func TestInstallLaysOutTheInstanceAndIsIdempotent(t *testing.T) {
	r := newRig(t)
	res, err := r.install(nil)
	if err != nil {
		t.Fatalf("%v\n%s", err, r.out.String())
	}
	l := r.layout()
	for p, want := range map[string]fs.FileMode{
		l.Binary(): 0o755, l.ConfigFile(): 0o640, l.TokenFile(): 0o400, l.StateDir(): 0o700,
		l.LogDir(): 0o750, l.OptDir(): 0o755, l.CronScript(): 0o755, l.CronEntry(): 0o644,
	} {
		if got := mode(t, p); got != want {
			t.Errorf("%s mode %04o, want %04o", p, got, want)
		}
	}
	conf, _ := os.ReadFile(l.ConfigFile())
	for _, want := range []string{"ws_uri=ws://127.0.0.1:1/agent/", "app_id=app-i", "version=1.0.0", "instance_id=i-inst0001", "engine=native", "conf_path=/var/lib/visualops/opsagent"} {
		if !bytes.Contains(conf, []byte(want)) {
			t.Errorf("config lacks %q:\n%s", want, conf)
		}
	}
	if data, _ := os.ReadFile(l.Binary()); !bytes.Contains(data, []byte("fake opsagent")) {
		t.Error("the binary was not copied")
	}
	cron, _ := os.ReadFile(l.CronEntry())
	if !bytes.Contains(cron, []byte(l.CronScript())) {
		t.Errorf("cron entry does not run the watchdog:\n%s", cron)
	}
	if _, err := os.Stat(l.UnitFile()); err == nil {
		t.Error("a systemd unit was written although systemd does not run in this root")
	}
	if !res.Changed || !strings.Contains(r.out.String(), "start") {
		t.Errorf("first install: changed=%v\n%s", res.Changed, r.out.String())
	}
	log, _ := os.ReadFile(l.BootstrapLog())
	if !bytes.Contains(log, []byte("opsagent install:")) {
		t.Errorf("bootstrap.log lacks the install's lines:\n%s", log)
	}

	// A second run with the same parameters changes nothing at all.
	before := snapshot(t, r.root.Dir())
	time.Sleep(10 * time.Millisecond) // a rewrite would show in the mtimes
	res, err = r.install(nil)
	if err != nil || res.Changed || res.Summary != "already installed, nothing to do" {
		t.Fatalf("re-run: %v changed=%v %q\n%s", err, res.Changed, res.Summary, r.out.String())
	}
	after := snapshot(t, r.root.Dir())
	for p, v := range before {
		if after[p] != v {
			t.Errorf("re-run touched %s", p)
		}
	}
	if len(after) != len(before) {
		t.Errorf("re-run added files: %d → %d", len(before), len(after))
	}
	if !strings.Contains(r.out.String(), "already installed, nothing to do") {
		t.Errorf("output:\n%s", r.out.String())
	}
}

// A re-run repairs what differs: a mode, a removed file, the config.
func TestReinstallRepairs(t *testing.T) {
	r := newRig(t)
	if _, err := r.install(nil); err != nil {
		t.Fatal(err)
	}
	l := r.layout()
	tok, _ := os.ReadFile(l.TokenFile())
	os.Chmod(l.StateDir(), 0o755)
	os.Remove(l.CronScript())
	res, err := r.install(func(o *Options) { o.Flags.Version = "1.0.1" })
	if err != nil || !res.Changed {
		t.Fatalf("%v %v\n%s", err, res.Changed, r.out.String())
	}
	if mode(t, l.StateDir()) != 0o700 || mode(t, l.CronScript()) != 0o755 {
		t.Error("not repaired")
	}
	if conf, _ := os.ReadFile(l.ConfigFile()); !bytes.Contains(conf, []byte("version=1.0.1")) {
		t.Errorf("version not updated:\n%s", conf)
	}
	if tok2, _ := os.ReadFile(l.TokenFile()); !bytes.Equal(tok, tok2) {
		t.Error("the token was regenerated although the app id is the same")
	}
	// Another app id: a new token, as the 2014 agent did.
	if _, err := r.install(func(o *Options) { o.Flags.AppID = "app-other" }); err != nil {
		t.Fatal(err)
	}
	if tok3, _ := os.ReadFile(l.TokenFile()); bytes.Equal(tok, tok3) {
		t.Error("the token was kept although the app id changed")
	}
}

// A re-run compares the installed binary with the running one to the last
// byte (it reads them a block at a time): one that differs only in its
// last block, at the same size, is replaced; one that is the same but
// 0644 gets its mode back and is not rewritten.
func TestReinstallComparesTheWholeBinary(t *testing.T) {
	r := newRig(t)
	self := append([]byte("#!/bin/sh\necho fake opsagent\nexit 0\n"), bytes.Repeat([]byte("#"), 600<<10)...)
	if err := os.WriteFile(r.self, self, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := r.install(nil); err != nil {
		t.Fatal(err)
	}
	l := r.layout()
	tampered := bytes.Clone(self)
	tampered[len(tampered)-1] = '!'
	if err := os.WriteFile(l.Binary(), tampered, 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := r.install(nil)
	if err != nil || !res.Changed {
		t.Fatalf("a binary differing in its last byte: %v changed=%v\n%s", err, res.Changed, r.out.String())
	}
	if b, _ := os.ReadFile(l.Binary()); !bytes.Equal(b, self) {
		t.Fatal("the binary differing in its last byte was not replaced")
	}
	if err := os.Chmod(l.Binary(), 0o644); err != nil {
		t.Fatal(err)
	}
	before, _ := os.Stat(l.Binary())
	res, err = r.install(nil)
	if err != nil || !res.Changed || mode(t, l.Binary()) != 0o755 {
		t.Fatalf("a 0644 binary: %v changed=%v mode %04o\n%s", err, res.Changed, mode(t, l.Binary()), r.out.String())
	}
	if after, _ := os.Stat(l.Binary()); !os.SameFile(before, after) {
		t.Error("a binary with the right bytes was rewritten for its mode")
	}
	if res, err = r.install(nil); err != nil || res.Changed {
		t.Fatalf("third run: %v changed=%v\n%s", err, res.Changed, r.out.String())
	}
}

// The userdata re-run after a self-update (config at 2.0.0, the 2.0.0
// binary in place) keeps 2.0.0: nothing to do. --downgrade installs 1.0.0.
func TestReinstallKeepsANewerSelfUpdate(t *testing.T) {
	r := newRig(t)
	if _, err := r.install(func(o *Options) { o.Flags.Version = "2.0.0" }); err != nil {
		t.Fatal(err)
	}
	l := r.layout()
	v2 := fakeBinary("2.0.0")
	if err := os.WriteFile(l.Binary(), v2, 0o755); err != nil { // as the updater left it
		t.Fatal(err)
	}
	res, err := r.install(nil) // the original userdata: 1.0.0
	if err != nil {
		t.Fatal(err)
	}
	if res.Changed || res.Summary != "already installed, nothing to do" || res.Params.Version != "2.0.0" {
		t.Errorf("changed=%v summary=%q version=%s\n%s", res.Changed, res.Summary, res.Params.Version, r.out.String())
	}
	if !strings.Contains(r.out.String(), "keeping 2.0.0") {
		t.Errorf("the output does not say it keeps 2.0.0:\n%s", r.out.String())
	}
	if b, _ := os.ReadFile(l.Binary()); !bytes.Equal(b, v2) {
		t.Error("the newer binary was replaced")
	}
	res, err = r.install(func(o *Options) { o.Downgrade = true })
	if err != nil || !res.Changed {
		t.Fatalf("--downgrade: %v %v", err, res.Changed)
	}
	if conf, _ := os.ReadFile(l.ConfigFile()); !bytes.Contains(conf, []byte("version=1.0.0")) {
		t.Errorf("--downgrade did not set 1.0.0:\n%s", conf)
	}
	if b, _ := os.ReadFile(l.Binary()); bytes.Equal(b, v2) {
		t.Error("--downgrade kept the 2.0.0 binary")
	}
}

// Unknown keys and comments of an existing config survive an install.
func TestInstallKeepsUnknownKeysAndComments(t *testing.T) {
	r := newRig(t)
	l := r.layout()
	os.MkdirAll(filepath.Dir(l.ConfigFile()), 0o755)
	os.WriteFile(l.ConfigFile(), []byte("; hand-written note\n[userdata]\nws_uri=ws://old:1/agent/\napp_id=app-i\n[custom]\nkeep=me\n"), 0o640)
	if _, err := r.install(nil); err != nil {
		t.Fatal(err)
	}
	conf, _ := os.ReadFile(l.ConfigFile())
	for _, want := range []string{"hand-written note", "[custom]", "keep=me", "ws_uri=ws://127.0.0.1:1/agent/"} {
		if !bytes.Contains(conf, []byte(want)) {
			t.Errorf("config lacks %q:\n%s", want, conf)
		}
	}
}

func TestDryRunWritesNothing(t *testing.T) {
	r := newRig(t)
	res, err := r.install(func(o *Options) { o.DryRun = true })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(r.root.Dir()); err == nil {
		var files []string
		filepath.WalkDir(r.root.Dir(), func(p string, d fs.DirEntry, err error) error { files = append(files, p); return nil })
		t.Fatalf("--dry-run wrote: %v", files)
	}
	for _, want := range []string{"would", "create", l(r).ConfigFile()} {
		if !strings.Contains(r.out.String(), want) {
			t.Errorf("plan lacks %q:\n%s", want, r.out.String())
		}
	}
	if !strings.Contains(res.Summary, "nothing was written") {
		t.Errorf("summary %q", res.Summary)
	}
}

func l(r *rig) config.Layout { return r.layout() }

func TestMissingParametersAreListedTogether(t *testing.T) {
	r := newRig(t)
	_, err := r.install(func(o *Options) { o.Flags = Params{AppID: "a"} })
	if !errors.Is(err, ErrMissingParams) {
		t.Fatalf("err %v", err)
	}
	for _, want := range []string{"--ws-uri (or WS_URI)", "--version (or VERSION)", "--base-remote (or BASE_REMOTE)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q lacks %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "--app-id") {
		t.Errorf("lists a parameter that was given: %v", err)
	}
}

func TestParametersFromTheEnvironment(t *testing.T) {
	r := newRig(t)
	env := map[string]string{"WS_URI": "wss://env.example.com/agent/", "APP_ID": "app-env", "VERSION": "2.0.0", "BASE_REMOTE": "https://releases.example.com"}
	res, err := r.install(func(o *Options) { o.Flags = Params{}; o.Env = func(k string) string { return env[k] } })
	if err != nil {
		t.Fatalf("%v\n%s", err, r.out.String())
	}
	if res.Params.AppID != "app-env" || res.Params.WSURI != env["WS_URI"] {
		t.Errorf("params %+v", res.Params)
	}
	// A flag wins over the environment.
	res, _ = r.install(func(o *Options) { o.Flags = Params{AppID: "app-flag"}; o.Env = func(k string) string { return env[k] } })
	if res.Params.AppID != "app-flag" {
		t.Errorf("flag did not win: %+v", res.Params)
	}
}

// With neither flags nor environment, the parameters come from the
// instance's userdata, through IMDSv2 or IMDSv1.
func TestParametersFromTheUserdata(t *testing.T) {
	ud := "#!/bin/bash\nWS_URI='wss://ud.example.com/agent/'\nAPP_ID='app-ud'\nVERSION='3.1'\nBASE_REMOTE='https://r.example.com'\nENROLL_SECRET='s3cret'\n"
	for _, v1 := range []bool{false, true} {
		name := map[bool]string{false: "IMDSv2", true: "IMDSv1"}[v1]
		t.Run(name, func(t *testing.T) {
			srv := imds.New(t, "i-ud", ud, v1)
			r := newRig(t)
			res, err := r.install(func(o *Options) {
				o.Flags = Params{}
				o.Sets = []string{"network.metadata=" + srv.URL, "agent.engine=native"}
			})
			if err != nil {
				t.Fatalf("%v\n%s", err, r.out.String())
			}
			if res.Params.AppID != "app-ud" || res.Params.EnrollSecret != "s3cret" || res.Params.Version != "3.1" {
				t.Errorf("params %+v", res.Params)
			}
			if !strings.Contains(r.out.String(), "from userdata") {
				t.Errorf("output does not say where the values came from:\n%s", r.out.String())
			}
		})
	}
}

func TestUninstallKeepsConfigTokenAndLogs(t *testing.T) {
	r := newRig(t)
	if _, err := r.install(nil); err != nil {
		t.Fatal(err)
	}
	l := r.layout()
	var out bytes.Buffer
	if err := Uninstall(context.Background(), UninstallOptions{Root: r.root, Out: &out}); err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{l.OptDir(), l.CronEntry(), l.StateDir()} {
		if _, err := os.Stat(gone); err == nil {
			t.Errorf("%s left behind", gone)
		}
	}
	for _, kept := range []string{l.ConfigFile(), l.TokenFile(), l.BootstrapLog()} {
		if _, err := os.Stat(kept); err != nil {
			t.Errorf("%s removed: %v", kept, err)
		}
	}
	// Again: nothing to do, no error.
	out.Reset()
	if err := Uninstall(context.Background(), UninstallOptions{Root: r.root, Out: &out}); err != nil || !strings.Contains(out.String(), "nothing left") {
		t.Fatalf("second uninstall: %v\n%s", err, out.String())
	}
	if err := Uninstall(context.Background(), UninstallOptions{Root: r.root, Purge: true, Out: &out}); err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{l.ConfigFile(), l.TokenFile(), l.LogDir()} {
		if _, err := os.Stat(gone); err == nil {
			t.Errorf("--purge left %s", gone)
		}
	}
}

// The virtualenv is built at install (with python3 here: no states
// repository is configured), and a re-run keeps it.
func TestInstallBuildsTheVirtualenv(t *testing.T) {
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 not installed")
	}
	r := newRig(t)
	sets := []string{"network.instance_id=i-1", "network.metadata=http://127.0.0.1:1"}
	if _, err := r.install(func(o *Options) { o.Sets = sets }); err != nil {
		t.Fatalf("%v\n%s", err, r.out.String())
	}
	l := r.layout()
	if _, err := os.Stat(filepath.Join(l.VenvDir(), "bin", "python")); err != nil {
		t.Fatalf("no virtualenv: %v\n%s", err, r.out.String())
	}
	conf, _ := os.ReadFile(l.ConfigFile())
	if !bytes.Contains(conf, []byte("package_path=/opt/visualops/env/lib/python3")) {
		t.Errorf("package_path not written:\n%s", conf)
	}
	res, err := r.install(func(o *Options) { o.Sets = sets })
	if err != nil || res.Changed {
		t.Fatalf("re-run: %v changed=%v\n%s", err, res.Changed, r.out.String())
	}
}

// BenchmarkInstall: into a fresh temp root with the prerequisites present
// (virtualenv build included, no package manager), and a re-run with
// nothing to do.
func BenchmarkInstall(b *testing.B) {
	if _, err := exec.LookPath("python3"); err != nil {
		b.Skip("python3 not installed")
	}
	for i := 0; i < b.N; i++ {
		dir := b.TempDir()
		root, _ := fsutil.NewRoot(filepath.Join(dir, "root"))
		self, _ := os.Executable()
		sets := []string{"network.instance_id=i-1", "network.metadata=http://127.0.0.1:1"}
		if py := os.Getenv("OPSAGENT_BENCH_PYTHON"); py != "" {
			// A real interpreter rather than a pyenv shim (a shell script
			// that costs ~150 ms a start), as on an instance.
			sets = append(sets, "salt.python="+py)
		}
		o := Options{Root: root, Flags: testParams, Sets: sets, Self: self}
		begin := time.Now()
		if _, err := Install(context.Background(), o); err != nil {
			b.Fatal(err)
		}
		first := time.Since(begin)
		begin = time.Now()
		res, err := Install(context.Background(), o)
		if err != nil || res.Changed {
			b.Fatalf("re-run: %v %v", err, res.Changed)
		}
		b.ReportMetric(float64(first.Milliseconds()), "install-ms")
		b.ReportMetric(float64(time.Since(begin).Milliseconds()), "rerun-ms")
	}
}

// Text from elsewhere in a step's line (here an app id from the userdata)
// reaches the terminal and bootstrap.log with its escapes made visible.
func TestReportShowsNoTerminalEscapes(t *testing.T) {
	r := newRig(t)
	_, _ = r.install(func(o *Options) { o.Flags.AppID = "app-\x1b]0;owned\x07\x1b[2J\u009b" })
	l := r.layout()
	log, _ := os.ReadFile(l.BootstrapLog())
	for name, s := range map[string]string{"output": r.out.String(), "bootstrap.log": string(log)} {
		if strings.ContainsAny(s, "\x1b\x07\u009b") {
			t.Errorf("%s carries a terminal escape:\n%q", name, s)
		}
	}
	if !strings.Contains(r.out.String(), `app-\x1b]0;owned\x07\x1b[2J\u009b`) {
		t.Errorf("the app id is not shown escaped:\n%s", r.out.String())
	}
}
