package native

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/proc"
	"github.com/visualops/opsagent/internal/testutil/debroot"
	"github.com/visualops/opsagent/internal/testutil/loopdev"
)

// BenchmarkNoChangeRoundStorage is the time of one state of each storage
// and supervisor module when everything is already in place, in the
// Debian rig on loop devices: what a round costs them (goal < 50 ms per
// state). mkfs and linux.lvm.pv read the device with one blkid; mount
// reads the mount table and fstab (no process); vg and lv run one LVM
// report (pvs, lvs); supervisord asks supervisord over its socket (no
// process). linux.raid cannot run here (no md driver): its no-change
// round is one mdadm --detail --scan.
func BenchmarkNoChangeRoundStorage(b *testing.B) {
	root := debroot.New(b)
	debroot.UseExtras(b, root)
	os.MkdirAll(filepath.Join(root, "etc/lvm"), 0o755)
	os.WriteFile(filepath.Join(root, "etc/lvm/lvmlocal.conf"), []byte("global {\n\tactivation = 0\n}\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc/supervisord.conf"), []byte(supervisorConf), 0o644)
	fr, err := fsutil.NewRoot(root)
	if err != nil {
		b.Fatal(err)
	}
	e := New(Options{Root: fr, Runner: proc.New(), KillGrace: time.Second})
	loopdev.New(b, root, "xvdf", 64<<20)
	loopdev.New(b, root, "sdb1", 64<<20)
	apply := func(module, param string) state.Result {
		return e.Execute(context.Background(), state.Request{RecipeVersion: 1, StateID: "bench-" + module, Module: module, Parameter: json.RawMessage(param)})
	}
	states := []struct{ name, module, param string }{
		{"mkfs", "linux.mkfs", `{"device": "/dev/xvdf", "fstype": "ext4", "label": "data"}`},
		{"mount", "linux.mount", `{"device": "/dev/xvdf", "filesystem": "ext4", "path": "/mnt/data", "opts": "noatime", "fstab": true}`},
		{"lvm.pv", "linux.lvm.pv", `{"path": ["/dev/sdb1"]}`},
		{"lvm.vg", "linux.lvm.vg", `{"name": "vgbench", "path": ["/dev/sdb1"]}`},
		{"lvm.lv", "linux.lvm.lv", `{"name": "lvbench", "vg-name": "vgbench", "le-size": "8M"}`},
		{"supervisord", "linux.supervisord", `{"config": "/etc/supervisord.conf", "name": ["foo", "grp"], "watch": ["/etc/supervisord.conf"]}`},
	}
	for _, st := range states {
		if r := apply(st.module, st.param); !r.OK {
			b.Fatalf("%s: setting up: %+v", st.name, r)
		}
	}
	for _, st := range states {
		b.Run(st.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if r := apply(st.module, st.param); !r.OK || r.Changed {
					b.Fatalf("%s: %+v", st.name, r)
				}
			}
		})
	}
}
