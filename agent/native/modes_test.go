package native

import (
	"os"
	"testing"
)

// Modes with setuid, setgid and sticky bits are set when a file or
// directory is created, and the next round finds them in place.
func TestSpecialModeBits(t *testing.T) {
	resolvers(t, func(t *testing.T, legacy bool) {
		r := newLinkRig(t, legacy)
		for _, tc := range []struct {
			module, param, path string
			mode                uint32
		}{
			{"linux.file", `{"path":"/bin/tool","content":"#!/bin/sh\n","mode":"4755"}`, "/bin/tool", 0o4755},
			{"linux.file", `{"path":"/bin/grp","mode":"2711"}`, "/bin/grp", 0o2711},
			{"linux.dir", `{"path":["/srv/shared"],"mode":"2775"}`, "/srv/shared", 0o2775},
			{"linux.dir", `{"path":["/scratch/tmp"],"mode":"1777"}`, "/scratch/tmp", 0o1777},
		} {
			mustOK(t, run(t, r.e, tc.module, tc.param), "updated: created")
			if mode, _, _ := stat(t, r.in(tc.path)); mode != tc.mode {
				t.Errorf("%s created %04o, want %04o", tc.path, mode, tc.mode)
			}
			mustOK(t, run(t, r.e, tc.module, tc.param), "already in the correct state")
		}
		// The parents a directory state creates get its mode too.
		if mode, _, _ := stat(t, r.in("/scratch")); mode != 0o1777 {
			t.Errorf("/scratch %04o", mode)
		}
		// Existing ones change to it, recursively for directories.
		if err := os.MkdirAll(r.in("/srv/shared/a/b"), 0o755); err != nil {
			t.Fatal(err)
		}
		mustOK(t, run(t, r.e, "linux.dir", `{"path":["/srv/shared"],"mode":"2775"}`), "updated: mode 2775")
		mustOK(t, run(t, r.e, "linux.dir", `{"path":["/srv/shared"],"mode":"2775"}`), "already in the correct state")
		if mode, _, _ := stat(t, r.in("/srv/shared/a/b")); mode != 0o2775 {
			t.Errorf("recursive %04o", mode)
		}
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/bin/tool","mode":"6755"}`), "updated: mode 6755")
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/bin/tool","mode":"6755"}`), "already in the correct state")
	})
}

// chown clears setuid and setgid, so the owner is set before the mode: a
// state asking for both is in place after one round, created or not.
func TestSpecialModeBitsWithOwner(t *testing.T) {
	needRoot(t)
	resolvers(t, func(t *testing.T, legacy bool) {
		r := newLinkRig(t, legacy)
		param := `{"path":"/bin/tool","content":"x","mode":"6755","user":"65534","group":"65534"}`
		mustOK(t, run(t, r.e, "linux.file", param), "created")
		mustOK(t, run(t, r.e, "linux.file", param), "already in the correct state")
		if mode, uid, _ := stat(t, r.in("/bin/tool")); mode != 0o6755 || uid != 65534 {
			t.Errorf("created %04o uid %d", mode, uid)
		}
		// An existing setuid file given a new owner keeps its bits.
		r.file(t, "/bin/other", "y", 0o755)
		if err := os.Chmod(r.in("/bin/other"), os.ModeSetuid|0o755); err != nil {
			t.Fatal(err)
		}
		param = `{"path":"/bin/other","mode":"4755","user":"65534"}`
		mustOK(t, run(t, r.e, "linux.file", param), "updated: owner, mode 4755")
		mustOK(t, run(t, r.e, "linux.file", param), "already in the correct state")
		// Rewriting the content of a setuid file keeps owner and bits.
		mustOK(t, run(t, r.e, "linux.file", `{"path":"/bin/other","content":"z"}`), "updated: content")
		mustOK(t, run(t, r.e, "linux.file", param), "already in the correct state")
		param = `{"path":["/srv/g"],"mode":"2770","group":"65534"}`
		mustOK(t, run(t, r.e, "linux.dir", param), "created")
		mustOK(t, run(t, r.e, "linux.dir", param), "already in the correct state")
	})
}
