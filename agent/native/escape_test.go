package native

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/rootfs/rootfstest"
)

// newExecAt is an Executor on root; legacy resolves paths as on kernels
// without openat2 (and chmods as without fchmodat2).
func newExecAt(t *testing.T, root string, legacy bool) *Executor {
	t.Helper()
	r, err := fsutil.NewRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	e := New(Options{Root: r, KillGrace: time.Second})
	e.rootOpts.Legacy = legacy
	return e
}

// resolvers runs a test with both of rootfs's resolvers.
func resolvers(t *testing.T, test func(t *testing.T, legacy bool)) {
	t.Run("openat2", func(t *testing.T) { test(t, false) })
	t.Run("walk", func(t *testing.T) { test(t, true) })
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
}

// Symlinks planted inside the root (see rootfstest.Plant: absolute and
// relative targets, as a parent component and as the final one, dangling,
// a chain) never let a state create, write, chmod, chown or remove
// anything outside the root, whatever the module and operation.
func TestPlantedSymlinksNeverEscapeTheRoot(t *testing.T) {
	needRoot(t)
	cases := []struct{ name, module, param string }{
		{"file content via abs parent", "linux.file", `{"path":"/abs/secret","content":"pwned"}`},
		{"file mode via rel parent", "linux.file", `{"path":"/rel/secret","mode":"0777"}`},
		{"file owner via deep parent", "linux.file", `{"path":"/deeprel/sub/inner","user":"65534","group":"65534"}`},
		{"file created via chain", "linux.file", `{"path":"/chain1/newfile","content":"x"}`},
		{"file mode via abs final link", "linux.file", `{"path":"/absfile","mode":"0600"}`},
		{"file all via rel final link", "linux.file", `{"path":"/relfile","content":"pwned","mode":"0600","user":"65534"}`},
		{"file via dangling link", "linux.file", `{"path":"/dangling","content":"x","mode":"0777"}`},
		{"file absent via parent", "linux.file", `{"path":"/abs/secret","absent":true}`},
		{"file absent on final link", "linux.file", `{"path":"/absfile","absent":true}`},
		{"dir mode via parent", "linux.dir", `{"path":["/abs/sub"],"mode":"0777"}`},
		{"dir created via rel parent", "linux.dir", `{"path":["/rel/newdir"],"mode":"0777"}`},
		{"dir recursive via chain", "linux.dir", `{"path":["/chain1/sub"],"mode":"0777","user":"65534"}`},
		{"dir recursive over links in tree", "linux.dir", `{"path":["/tree"],"mode":"0777","user":"65534","group":"65534"}`},
		{"dir on a link to outside", "linux.dir", `{"path":["/abs","/rel"],"mode":"0777","user":"65534"}`},
		{"dir absent via parent", "linux.dir", `{"path":["/abs/sub"],"absent":true}`},
		{"dir absent over links in tree", "linux.dir", `{"path":["/tree","/abs"],"absent":true}`},
		{"symlink created via parent", "linux.symlink", `{"source":"/x","target":"/abs/newlink"}`},
		{"symlink replaced via parent", "linux.symlink", `{"source":"/y","target":"/rel/outlink"}`},
		{"symlink owner via parent", "linux.symlink", `{"source":"secret","target":"/abs/outlink","user":"65534"}`},
		{"symlink absent via parent", "linux.symlink", `{"target":"/deeprel/outlink","absent":true}`},
		{"cmd cwd via parent", "linux.cmd", `{"cmd":"touch marker","cwd":"/abs/work"}`},
		{"cmd cwd via rel link", "linux.cmd", `{"cmd":"touch marker","cwd":"/rel/sub"}`},
		{"cmd cwd chown via link", "linux.cmd", `{"cmd":"true","cwd":"/abs","user":"65534"}`},
	}
	resolvers(t, func(t *testing.T, legacy bool) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				l := rootfstest.Plant(t)
				r := run(t, newExecAt(t, l.Root, legacy), tc.module, tc.param)
				l.Check(t)
				if strings.Contains(r.Comment, l.Root) {
					t.Errorf("comment names the host path: %s", r.Comment)
				}
			})
		}
	})
}

// if-path-present and if-path-absent look paths up inside the root: a
// link that leads outside does not make an outside file count.
func TestCmdIfPathInRoot(t *testing.T) {
	resolvers(t, func(t *testing.T, legacy bool) {
		l := rootfstest.Plant(t)
		e := newExecAt(t, l.Root, legacy)
		mustOK(t, run(t, e, "linux.cmd", `{"cmd":"echo ran","if-path-present":"/abs/secret"}`), "skipped: /abs/secret does not exist")
		mustOK(t, run(t, e, "linux.cmd", `{"cmd":"echo ran","if-path-present":["/tree/f","/tree/out/secret"]}`), "skipped")
		if r := run(t, e, "linux.cmd", `{"cmd":"echo ran","if-path-absent":["/rel/secret","/chain1/sub"]}`); !r.OK || r.Stdout != "ran\n" {
			t.Errorf("if-path-absent through links: %+v", r)
		}
		// A link itself is a path that exists, dangling or not.
		mustOK(t, run(t, e, "linux.cmd", `{"cmd":"echo ran","if-path-absent":"/dangling"}`), "skipped: /dangling exists")
		l.Check(t)
	})
}

// The working directory is resolved inside the root, absolute links
// included, and the command starts there.
func TestCmdCwdResolvedInRoot(t *testing.T) {
	resolvers(t, func(t *testing.T, legacy bool) {
		l := rootfstest.Plant(t)
		inRoot := filepath.Join(l.Root, l.Outside) // where /abs points, seen from the root
		for _, d := range []string{inRoot, filepath.Join(l.Root, "outside")} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		e := newExecAt(t, l.Root, legacy)
		r := run(t, e, "linux.cmd", `{"cmd":"pwd; touch marker","cwd":"/abs/work"}`)
		if !r.OK || r.Stdout != filepath.Join(inRoot, "work")+"\n" {
			t.Fatalf("cwd through an absolute link: %+v", r)
		}
		if _, err := os.Stat(filepath.Join(inRoot, "work/marker")); err != nil {
			t.Error(err)
		}
		r = run(t, e, "linux.cmd", `{"cmd":"pwd","cwd":"/rel/sub"}`)
		if !r.OK || r.Stdout != filepath.Join(l.Root, "outside/sub")+"\n" {
			t.Fatalf("cwd through a relative link: %+v", r)
		}
		l.Check(t)
	})
}
