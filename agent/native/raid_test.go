package native

import (
	"context"
	"encoding/json"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"golang.org/x/sys/unix"
)

// scripted is a proc.Runner that runs nothing: each command is answered
// by fn and recorded, for the paths this kernel cannot run for real
// (md: no CONFIG_MD here).
type scripted struct {
	mu    sync.Mutex
	calls []string
	fn    func(tool string, args []string) proc.Result
}

func (f *scripted) Run(_ context.Context, c proc.Cmd) (proc.Result, error) {
	tool := path.Base(c.Path)
	f.mu.Lock()
	f.calls = append(f.calls, strings.TrimSpace(tool+" "+strings.Join(c.Args, " ")))
	f.mu.Unlock()
	return f.fn(tool, c.Args), nil
}

func (f *scripted) take() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := f.calls
	f.calls = nil
	return out
}

// fakeRoot is a Debian-looking root with stubs of tools (so that they
// are found installed) and block device nodes (device numbers that need
// not exist: nothing opens them).
func fakeRoot(t *testing.T, tools []string, devs map[string]uint64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mknod)")
	}
	root := t.TempDir()
	for _, d := range []string{"etc", "sbin", "dev/md"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(root, "etc/os-release"), []byte("ID=debian\nVERSION_ID=12\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"), 0o644)
	for _, tool := range tools {
		os.WriteFile(filepath.Join(root, "sbin", tool), []byte("#!/bin/sh\nexit 99\n"), 0o755)
	}
	for name, rdev := range devs {
		if err := unix.Mknod(filepath.Join(root, name), unix.S_IFBLK|0o660, int(rdev)); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func req(module, param string, test bool) state.Request {
	return state.Request{RecipeVersion: 1, StateID: "s-" + module, Module: module, Parameter: json.RawMessage(param), Test: test}
}

func fakeExec(t *testing.T, root string, r proc.Runner) *Executor {
	t.Helper()
	fr, err := fsutil.NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	return New(Options{Root: fr, Runner: r, KillGrace: time.Second})
}

// mdWorld answers mdadm and blkid as a machine with md would: what
// mdadm --create makes is listed by mdadm --detail --scan (the format of
// mdadm(8)) and its members then carry a linux_raid_member signature.
type mdWorld struct {
	arrays map[string]string // device → its --detail --scan line
	sigs   map[string]string // device → blkid -o export output
}

func (w *mdWorld) answer(tool string, args []string) proc.Result {
	switch tool {
	case "blkid":
		dev := args[len(args)-1]
		if out, ok := w.sigs[dev]; ok {
			return proc.Result{Output: out}
		}
		return proc.Result{ExitCode: 2}
	case "mdadm":
		if len(args) == 2 && args[0] == "--detail" && args[1] == "--scan" {
			var out string
			for _, l := range w.arrays {
				out += l + "\n"
			}
			return proc.Result{Output: out}
		}
		if args[0] == "--create" {
			name := args[1]
			w.arrays[name] = "ARRAY " + name + " metadata=1.2 name=web1:0 UUID=3aaa0122:29827cfa:5331ad66:ca767371"
			for _, a := range args {
				if strings.HasPrefix(a, "/dev/sd") {
					w.sigs[a] = "DEVNAME=" + a + "\nUUID=3aaa0122-2982-7cfa-5331-ad66ca767371\nUUID_SUB=6b4f0a2a-8f9e-4d43-a41c-92a5c2b8a6b1\nLABEL=web1:0\nVERSION=1.2\nTYPE=linux_raid_member\nUSAGE=raid\n"
				}
			}
			return proc.Result{Output: "mdadm: array " + name + " started.\n"}
		}
	case "update-initramfs":
		return proc.Result{Output: "update-initramfs: Generating /boot/initrd.img-6.1.0-18-amd64\n"}
	}
	return proc.Result{ExitCode: 127, Output: tool + ": unexpected call " + strings.Join(args, " ")}
}

// TestRaidCommandSequence: this kernel has no md driver, so mdadm is
// answered by mdWorld and the test holds the exact commands: a blank
// pair becomes an array with --run but not --force, recorded in
// mdadm.conf and the initramfs; the next round only lists the arrays; an
// existing array is left alone whatever the recipe says; a member that
// holds a filesystem or another array's superblock is refused, naming
// it, with no mdadm --create.
func TestRaidCommandSequence(t *testing.T) {
	root := fakeRoot(t, []string{"mdadm", "blkid", "update-initramfs"}, map[string]uint64{
		"dev/sdb": unix.Mkdev(8, 16), "dev/sdc": unix.Mkdev(8, 32), "dev/sdd": unix.Mkdev(8, 48), "dev/md0": unix.Mkdev(9, 0),
	})
	w := &mdWorld{arrays: map[string]string{}, sigs: map[string]string{}}
	run := &scripted{fn: w.answer}
	e := fakeExec(t, root, run)
	param := `{"device-name": "/dev/md0", "level": "raid1", "devices": ["/dev/sdb", "/dev/sdc"], "arguments": [{"key": "chunk", "value": "256"}, {"key": "bitmap", "value": "internal"}]}`

	check := e.Execute(context.Background(), req("linux.raid", param, true))
	if !check.OK || !check.Changed || check.Comment != "RAID array /dev/md0 would be updated: created (raid1 on /dev/sdb, /dev/sdc)" {
		t.Fatalf("check mode: %+v", check)
	}
	want := []string{"mdadm --detail --scan", "blkid -p -o export /dev/sdb", "blkid -p -o export /dev/sdc"}
	if got := run.take(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("check mode ran %q", got)
	}

	r := e.Execute(context.Background(), req("linux.raid", param, false))
	if !r.OK || !r.Changed || r.Comment != "RAID array /dev/md0 updated: created (raid1 on /dev/sdb, /dev/sdc), recorded in /etc/mdadm/mdadm.conf, initramfs updated" {
		t.Fatalf("first round: %+v", r)
	}
	want = []string{
		"mdadm --detail --scan",
		"blkid -p -o export /dev/sdb",
		"blkid -p -o export /dev/sdc",
		"mdadm --create /dev/md0 --run --level=raid1 --raid-devices=2 --chunk=256 --bitmap=internal /dev/sdb /dev/sdc",
		"mdadm --detail --scan",
		"update-initramfs -u",
	}
	if got := run.take(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("first round ran\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	conf, _ := os.ReadFile(filepath.Join(root, "etc/mdadm/mdadm.conf"))
	if string(conf) != "ARRAY /dev/md0 metadata=1.2 name=web1:0 UUID=3aaa0122:29827cfa:5331ad66:ca767371\n" {
		t.Fatalf("mdadm.conf %q", conf)
	}

	// Next round, and a recipe that now says otherwise: left alone.
	for _, p := range []string{param, `{"device-name": "/dev/md0", "level": "raid5", "devices": ["/dev/sdb", "/dev/sdc", "/dev/sdd"]}`} {
		r = e.Execute(context.Background(), req("linux.raid", p, false))
		if !r.OK || r.Changed || r.Comment != "RAID array /dev/md0 is already in the correct state (an existing array is never changed)" {
			t.Fatalf("next round: %+v", r)
		}
		if got := run.take(); strings.Join(got, "\n") != "mdadm --detail --scan" {
			t.Fatalf("next round ran %q", got)
		}
	}

	// Members of md0 asked for md1: refused, naming the superblock.
	r = e.Execute(context.Background(), req("linux.raid", `{"device-name": "/dev/md1", "level": "1", "devices": "/dev/sdd, /dev/sdb"}`, false))
	if r.OK || r.Comment != "linux.raid: /dev/sdb holds a RAID member (mdadm) (label web1:0, UUID 3aaa0122-2982-7cfa-5331-ad66ca767371); refusing to build /dev/md1 on it: it belongs to another array: assemble that one (mdadm --assemble --scan), or wipe it first (mdadm --zero-superblock /dev/sdb)" {
		t.Fatalf("member of another array: %+v", r)
	}
	w.sigs["/dev/sdd"] = "DEVNAME=/dev/sdd\nUUID=0f3e-11\nLABEL=data\nTYPE=xfs\nUSAGE=filesystem\n"
	r = e.Execute(context.Background(), req("linux.raid", `{"device-name": "/dev/md1", "level": "mirror", "devices": ["/dev/sdd"]}`, false))
	if r.OK || !strings.HasPrefix(r.Comment, "linux.raid: /dev/sdd holds an xfs filesystem (label data, UUID 0f3e-11); refusing to build /dev/md1 on it") {
		t.Fatalf("filesystem: %+v", r)
	}
	for _, c := range run.take() {
		if strings.Contains(c, "--create") {
			t.Fatalf("a refusal ran %q", c)
		}
	}
	bad := e.Execute(context.Background(), req("linux.raid", `{"device-name": "/dev/md1", "level": "raid7", "devices": ["/dev/sdd"]}`, false))
	mustFail(t, bad, "linux.raid: parameter level: must be one of")
}

// TestParseMdadmScan reads mdadm --detail --scan as mdadm(8) prints it.
func TestParseMdadmScan(t *testing.T) {
	out := "ARRAY /dev/md0 metadata=1.2 name=web1:0 UUID=3aaa0122:29827cfa:5331ad66:ca767371\nARRAY /dev/md/data metadata=1.2 spares=1 name=web1:data UUID=11111111:22222222:33333333:44444444\n"
	a := parseMdadmScan(out)
	if len(a) != 2 || a[0].dev != "/dev/md0" || a[1].dev != "/dev/md/data" || a[1].attrs["spares"] != "1" || a[1].attrs["uuid"] != "11111111:22222222:33333333:44444444" {
		t.Fatalf("%+v", a)
	}
}
