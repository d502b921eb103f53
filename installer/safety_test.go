package installer

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
)

// victim is a directory outside the root with a file in it, whose modes
// and contents must survive whatever the installer does.
type victim struct {
	dir, file string
	content   string // the file's content, "precious\n" unless planted otherwise
}

func newVictim(t *testing.T) victim {
	t.Helper()
	v := victim{dir: filepath.Join(t.TempDir(), "outside"), content: "precious\n"}
	v.file = filepath.Join(v.dir, "precious")
	if err := os.Mkdir(v.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(v.file, []byte("precious\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return v
}

// check wants the victim as it was made: the directory 0755 holding only
// the file, the file 0644 with its content.
func (v victim) check(t *testing.T) {
	t.Helper()
	if m := mode(t, v.dir); m != 0o755 {
		t.Errorf("the directory outside was chmodded to %04o", m)
	}
	if m := mode(t, v.file); m != 0o644 {
		t.Errorf("the file outside was chmodded to %04o", m)
	}
	if data, _ := os.ReadFile(v.file); string(data) != v.content {
		t.Errorf("the file outside was written: %q", data)
	}
	entries, _ := os.ReadDir(v.dir)
	if len(entries) != 1 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("files were created outside the root: %v", names)
	}
}

func symlink(t *testing.T, target, p string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	_ = os.RemoveAll(p)
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}

// A link planted at a fixed path, or on the way to one, stops the install
// with the path's name, and nothing it leads to is chmodded or written.
func TestInstallNeverFollowsALinkOut(t *testing.T) {
	cases := []struct {
		name string
		// plant sets the link up (after a first install when installed).
		plant     func(t *testing.T, r *rig, v *victim)
		installed bool
		tweak     func(*Options)
		want      func(r *rig) string
	}{
		{name: "config", installed: true,
			plant: func(t *testing.T, r *rig, v *victim) {
				data, _ := os.ReadFile(r.layout().ConfigFile())
				if err := os.WriteFile(v.file, data, 0o644); err != nil {
					t.Fatal(err)
				}
				v.content = string(data)
				symlink(t, v.file, r.layout().ConfigFile())
			},
			want: func(r *rig) string { return r.layout().ConfigFile() + " is a symbolic link" }},
		{name: "binary kept as newer", installed: true,
			tweak: func(o *Options) { o.Flags.Version = "2.0.0" },
			plant: func(t *testing.T, r *rig, v *victim) {
				if err := os.WriteFile(v.file, fakeBinary("2.0.0"), 0o644); err != nil {
					t.Fatal(err)
				}
				v.content = string(fakeBinary("2.0.0"))
				symlink(t, v.file, r.layout().Binary())
			},
			want: func(r *rig) string { return r.layout().Binary() + " is a symbolic link" }},
		{name: "state directory",
			plant: func(t *testing.T, r *rig, v *victim) { symlink(t, v.dir, r.layout().StateDir()) },
			want:  func(r *rig) string { return r.layout().StateDir() + " is a symbolic link" }},
		{name: "log directory",
			plant: func(t *testing.T, r *rig, v *victim) { symlink(t, v.dir, r.layout().LogDir()) },
			want:  func(r *rig) string { return r.layout().LogDir() + " is a symbolic link" }},
		{name: "token", installed: true,
			plant: func(t *testing.T, r *rig, v *victim) { symlink(t, v.file, r.layout().TokenFile()) },
			want:  func(r *rig) string { return r.layout().TokenFile() + " is a symbolic link" }},
		{name: "watchdog",
			plant: func(t *testing.T, r *rig, v *victim) { symlink(t, v.file, r.layout().CronScript()) },
			want:  func(r *rig) string { return r.layout().CronScript() + " is a symbolic link" }},
		{name: "a directory on the way, absolute",
			plant: func(t *testing.T, r *rig, v *victim) { symlink(t, v.dir, r.root.Path("/var/lib")) },
			want:  func(r *rig) string { return r.root.Path("/var/lib") + " leads out of the root" }},
		{name: "a directory on the way, relative",
			plant: func(t *testing.T, r *rig, v *victim) {
				rel, _ := filepath.Rel(r.root.Path("/var"), v.dir)
				symlink(t, rel, r.root.Path("/var/log"))
			},
			want: func(r *rig) string { return r.root.Path("/var/log") + " leads out of the root" }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, v := newRig(t), newVictim(t)
			if c.installed {
				if _, err := r.install(c.tweak); err != nil {
					t.Fatalf("%v\n%s", err, r.out.String())
				}
			}
			c.plant(t, r, &v)
			_, err := r.install(nil)
			if !errors.Is(err, ErrUnsafePath) || !strings.Contains(err.Error(), c.want(r)) {
				t.Errorf("err = %v\nwant it to say %q\n%s", err, c.want(r), r.out.String())
			}
			v.check(t)
		})
	}
}

// Uninstall removes inside the root only: a directory on the way that
// leads out is not followed.
func TestUninstallStaysInTheRoot(t *testing.T) {
	r, v := newRig(t), newVictim(t)
	if _, err := r.install(nil); err != nil {
		t.Fatal(err)
	}
	// What the host would reach through the link: a tree of someone else's.
	if err := os.MkdirAll(filepath.Join(v.dir, "visualops/opsagent"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(r.root.Path("/var/lib")); err != nil {
		t.Fatal(err)
	}
	symlink(t, v.dir, r.root.Path("/var/lib"))
	var out strings.Builder
	_ = Uninstall(context.Background(), UninstallOptions{Root: r.root, Out: &out, Purge: true})
	if _, err := os.Stat(filepath.Join(v.dir, "visualops/opsagent")); err != nil {
		t.Errorf("uninstall removed a directory outside the root: %v\n%s", err, out.String())
	}
	v.check2(t)
}

// check2 is check for a victim that was given a subtree.
func (v victim) check2(t *testing.T) {
	t.Helper()
	if data, _ := os.ReadFile(v.file); string(data) != "precious\n" {
		t.Errorf("the file outside was written: %q", data)
	}
}

// recorder is a proc.Runner that records command lines and runs nothing;
// answer says how each ends.
type recorder struct {
	mu     sync.Mutex
	calls  [][]string
	answer func(argv []string) int
}

func (r *recorder) Run(_ context.Context, c proc.Cmd) (proc.Result, error) {
	argv := append([]string{c.Path}, c.Args...)
	r.mu.Lock()
	r.calls = append(r.calls, argv)
	r.mu.Unlock()
	code := 0
	if r.answer != nil {
		code = r.answer(argv)
	}
	return proc.Result{ExitCode: code}, nil
}

func (r *recorder) systemctl() [][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out [][]string
	for _, c := range r.calls {
		if c[0] == "systemctl" {
			out = append(out, c)
		}
	}
	return out
}

func notEnabledYet(argv []string) int {
	if slices.Contains(argv, "is-enabled") {
		return 1
	}
	return 0
}

func systemdRoot(t *testing.T, r *rig) {
	t.Helper()
	if err := os.MkdirAll(r.root.Path("/run/systemd/system"), 0o755); err != nil {
		t.Fatal(err)
	}
}

// Below a root other than the host's, install and uninstall only enable
// and disable the unit with systemctl --root, even with --start: the
// systemd that runs is the host's, and it is never told to reload, start
// or stop anything.
func TestSystemctlBelowARootNeverDrivesTheHost(t *testing.T) {
	r := newRig(t)
	systemdRoot(t, r)
	rec := &recorder{answer: notEnabledYet}
	res, _ := r.install(func(o *Options) { o.Runner = rec; o.Start = true; o.StartTimeout = 2 * time.Second })
	dir := r.root.Dir()
	want := [][]string{
		{"systemctl", "--root=" + dir, "is-enabled", "--quiet", "opsagent.service"},
		{"systemctl", "--root=" + dir, "enable", "opsagent.service"},
	}
	if got := rec.systemctl(); !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("install ran\n%q\nwant\n%q\n%s", got, want, r.out.String())
	}
	if _, err := os.Stat(r.layout().UnitFile()); err != nil {
		t.Errorf("no unit written below the root: %v", err)
	}
	if !strings.Contains(r.out.String(), "the host's systemd is not told") {
		t.Errorf("the output does not say the host's systemd was left alone:\n%s", r.out.String())
	}
	// The fake binary exits at once: that is a failed start, never
	// "running as pid 0".
	if res == nil || res.PID != 0 || strings.Contains(r.out.String(), "pid 0") || !strings.Contains(r.out.String(), "the agent exited at once") {
		t.Errorf("start of an agent that exits:\n%s", r.out.String())
	}

	rec.calls = nil
	var out strings.Builder
	if err := Uninstall(context.Background(), UninstallOptions{Root: r.root, Runner: rec, Out: &out}); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	want = [][]string{{"systemctl", "--root=" + dir, "disable", "opsagent.service"}}
	if got := rec.systemctl(); !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("uninstall ran\n%q\nwant\n%q\n%s", got, want, out.String())
	}
}

// On the host, systemd is driven as before: reload, enable, start; and a
// start after which no agent holds the lock is a failure.
func TestSystemctlOnTheHost(t *testing.T) {
	for _, starts := range []bool{true, false} {
		t.Run(map[bool]string{true: "agent starts", false: "agent never starts"}[starts], func(t *testing.T) {
			r := newRig(t)
			systemdRoot(t, r)
			var lock *fsutil.LockFile
			t.Cleanup(func() { lock.Unlock() })
			rec := &recorder{answer: func(argv []string) int {
				if slices.Contains(argv, "start") && starts {
					// What systemd would do: an agent that takes its lock.
					var err error
					if lock, err = fsutil.Lock(r.layout().LockFile()); err != nil {
						t.Error(err)
					}
				}
				return notEnabledYet(argv)
			}}
			res, err := r.install(func(o *Options) {
				o.Runner, o.treatAsHost, o.SkipPackages, o.StartTimeout = rec, true, true, 300*time.Millisecond
			})
			want := [][]string{
				{"systemctl", "daemon-reload"},
				{"systemctl", "is-enabled", "--quiet", "opsagent.service"},
				{"systemctl", "enable", "opsagent.service"},
				{"systemctl", "start", "opsagent.service"},
			}
			if got := rec.systemctl(); !slices.EqualFunc(got, want, slices.Equal) {
				t.Errorf("install ran\n%q\nwant\n%q\n%s", got, want, r.out.String())
			}
			if starts {
				if err != nil || res.PID != os.Getpid() {
					t.Errorf("err %v pid %d\n%s", err, res.PID, r.out.String())
				}
				return
			}
			if !errors.Is(err, ErrStepsFailed) || res.PID != 0 || !strings.Contains(r.out.String(), "no new agent holds") {
				t.Errorf("a start that leaves no agent: err %v\n%s", err, r.out.String())
			}
		})
	}
	r := newRig(t)
	systemdRoot(t, r)
	if _, err := r.install(func(o *Options) { o.Runner = &recorder{} }); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	var out strings.Builder
	if err := Uninstall(context.Background(), UninstallOptions{Root: r.root, Runner: rec, Out: &out, treatAsHost: true}); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	want := [][]string{{"systemctl", "disable", "--now", "opsagent.service"}, {"systemctl", "daemon-reload"}}
	if got := rec.systemctl(); !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("uninstall ran\n%q\nwant\n%q", got, want)
	}
}

// A malformed pubkey is refused by install and userdata, naming it,
// before anything is written.
func TestMalformedPubkeyRefused(t *testing.T) {
	for _, key := range []string{"not-a-key", "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GF", "untrusted comment: x\nRWQ"} {
		r := newRig(t)
		_, err := r.install(func(o *Options) { o.Flags.PubKey = key })
		if err == nil || !strings.Contains(err.Error(), "[userdata] pubkey") || !strings.Contains(err.Error(), "--pubkey") {
			t.Errorf("install --pubkey %q: %v", key, err)
		}
		if _, err := os.Stat(r.layout().ConfigFile()); err == nil {
			t.Errorf("install --pubkey %q wrote the config", key)
		}
		p := testParams
		p.PubKey = key
		if _, err := Userdata(context.Background(), UserdataOptions{Params: p, SHA256: strings.Repeat("a", 64)}); err == nil || !strings.Contains(err.Error(), "pubkey") {
			t.Errorf("userdata --pubkey %q: %v", key, err)
		}
	}
	r := newRig(t)
	if _, err := r.install(func(o *Options) { o.Flags.PubKey = "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3" }); err != nil {
		t.Errorf("a good key refused: %v", err)
	}
}

// A binary kept because the config names a newer version must run and
// say that version; a 0-byte or other binary is reinstalled.
func TestKeptBinaryMustRunAsTheNewerVersion(t *testing.T) {
	for name, data := range map[string][]byte{
		"empty":         {},
		"not a program": []byte("\x7fELF garbage"),
		"other version": fakeBinary("1.5.0"),
		"fails":         []byte("#!/bin/sh\nexit 3\n"),
	} {
		t.Run(name, func(t *testing.T) {
			r := newRig(t)
			if _, err := r.install(func(o *Options) { o.Flags.Version = "2.0.0" }); err != nil {
				t.Fatal(err)
			}
			l := r.layout()
			if err := os.WriteFile(l.Binary(), data, 0o755); err != nil {
				t.Fatal(err)
			}
			res, err := r.install(nil)
			if err != nil {
				t.Fatalf("%v\n%s", err, r.out.String())
			}
			self, _ := os.ReadFile(r.self)
			if got, _ := os.ReadFile(l.Binary()); string(got) != string(self) || res.Params.Version != "1.0.0" {
				t.Errorf("kept a binary that does not run as 2.0.0 (version %s):\n%s", res.Params.Version, r.out.String())
			}
			if !strings.Contains(r.out.String(), "does not run as 2.0.0") {
				t.Errorf("the output does not say why:\n%s", r.out.String())
			}
		})
	}
}

// Path keys may not name something that exists and is not opsagent's:
// --set global.token=/etc/passwd was chmodded 0400 and sent as the token.
func TestPathKeysNeverTakeOverAFile(t *testing.T) {
	for _, c := range []struct {
		set, plant, want string
	}{
		{"global.token=/etc/passwd", "/etc/passwd", "/etc/passwd is a file of the system's /etc"},
		{"global.token=/home/alice/notes", "/home/alice/notes", "exists and opsagent did not make it"},
		{"global.logfile=/srv/app/data.db", "/srv/app/data.db", "exists and opsagent did not make it"},
		{"global.conf_path=/home/alice", "/home/alice/notes", "exists and opsagent did not make it"},
		{"global.log_path=/usr/lib/x", "", "is in /usr"},
	} {
		t.Run(c.set, func(t *testing.T) {
			r := newRig(t)
			planted := ""
			if c.plant != "" {
				planted = r.root.Path(c.plant)
				if err := os.MkdirAll(filepath.Dir(planted), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(planted, []byte("root:x:0:0\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			_, err := r.install(func(o *Options) { o.Sets = append(slices.Clone(nativeSets), c.set) })
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("err = %v, want %q\n%s", err, c.want, r.out.String())
			}
			if planted != "" {
				if m := mode(t, planted); m != 0o644 {
					t.Errorf("%s chmodded to %04o", planted, m)
				}
				if data, _ := os.ReadFile(planted); string(data) != "root:x:0:0\n" {
					t.Errorf("%s written: %q", planted, data)
				}
			}
			if _, err := os.Stat(r.layout().ConfigFile()); err == nil {
				t.Error("the config was written")
			}
		})
	}
	// A new path, or an empty directory made ready, is fine, and stays
	// fine on re-runs (the existing config names it).
	r := newRig(t)
	if err := os.MkdirAll(r.root.Path("/srv/opsagent-state"), 0o755); err != nil {
		t.Fatal(err)
	}
	sets := append(slices.Clone(nativeSets), "global.token=/srv/opsagent-id/token", "global.conf_path=/srv/opsagent-state")
	for i := 0; i < 2; i++ {
		if _, err := r.install(func(o *Options) { o.Sets = sets }); err != nil {
			t.Fatalf("run %d: %v\n%s", i, err, r.out.String())
		}
	}
	if m := mode(t, r.root.Path("/srv/opsagent-id/token")); m != 0o400 {
		t.Errorf("token mode %04o", m)
	}
}

// What install writes, the agent reads: a config over the agent's limit
// is refused before anything is written; userdata refuses a value that
// install would refuse.
func TestInstallAndUserdataAgreeWithTheReader(t *testing.T) {
	r := newRig(t)
	big := "custom.big=" + strings.Repeat("x", 1200<<10)
	_, err := r.install(func(o *Options) { o.Sets = append(slices.Clone(nativeSets), big) })
	if err == nil || !strings.Contains(err.Error(), "over the 1048576 bytes the agent reads") {
		t.Errorf("a 1.2 MB config: %v\n%s", err, r.out.String())
	}
	if _, err := os.Stat(r.layout().ConfigFile()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the config was written: %v", err)
	}
	for _, c := range []struct {
		tweak func(*Params, *[]string)
		want  string
	}{
		{func(p *Params, _ *[]string) { p.EnrollSecret = "s3cr\ret" }, "--enroll-secret (or ENROLL_SECRET): config: [userdata] enroll_secret: the value spans several lines"},
		{func(p *Params, _ *[]string) { p.AppID = "app\x1b[2J" }, "--app-id (or APP_ID): config: [userdata] app_id: the value has a control character"},
		{func(_ *Params, s *[]string) { *s = append(*s, "agent.retry_delay=soon") }, "--set agent.retry_delay: config: [agent] retry_delay"},
		{func(_ *Params, s *[]string) { *s = append(*s, "global.token=/etc/shadow") }, "/etc/shadow is a file of the system's /etc"},
	} {
		p, sets := testParams, slices.Clone(nativeSets)
		c.tweak(&p, &sets)
		_, err := Userdata(context.Background(), UserdataOptions{Params: p, Sets: sets, SHA256: strings.Repeat("a", 64)})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("userdata: %v\nwant %q", err, c.want)
		}
		r := newRig(t)
		_, err = r.install(func(o *Options) { o.Flags = p; o.Sets = sets })
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("install: %v\nwant %q", err, c.want)
		}
	}
}
