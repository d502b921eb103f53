package fsutil

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

func TestRootPathNeverEscapes(t *testing.T) {
	dir := t.TempDir()
	r, err := NewRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{
		"/etc/opsagent.conf":          filepath.Join(dir, "etc/opsagent.conf"),
		"etc/opsagent.conf":           filepath.Join(dir, "etc/opsagent.conf"),
		"/../../etc/passwd":           filepath.Join(dir, "etc/passwd"),
		"/var/lib/../../../../tmp/x":  filepath.Join(dir, "tmp/x"),
		"/":                           dir,
		"":                            dir,
		"/opt/visualops//bin/./agent": filepath.Join(dir, "opt/visualops/bin/agent"),
	}
	for in, want := range cases {
		if got := r.Path(in); got != want {
			t.Errorf("Path(%q) = %q, want %q", in, got, want)
		}
	}
	if r.IsHost() {
		t.Error("a temp root claims to be the host")
	}
	host, _ := NewRoot("")
	if !host.IsHost() || host.Path("/etc/x") != "/etc/x" {
		t.Errorf("host root: %q", host.Path("/etc/x"))
	}
	var zero Root
	if zero.Dir() != "/" {
		t.Errorf("zero Root dir = %q", zero.Dir())
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "recipe.json")
	if err := WriteFileAtomic(p, []byte("one"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(p, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(p)
	st, _ := os.Stat(p)
	if string(data) != "two" || st.Mode().Perm() != 0o600 {
		t.Errorf("content %q mode %v", data, st.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temp files left: %d entries", len(entries))
	}
	err := WriteFileAtomic(filepath.Join(dir, "missing", "x"), []byte("x"), 0o600)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "missing", "x")) {
		t.Errorf("error does not name the path: %v", err)
	}
}

// Concurrent writers never leave a torn file: every read sees one whole
// version.
func TestWriteFileAtomicConcurrentReaders(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	a, b := strings.Repeat("a", 1<<16), strings.Repeat("b", 1<<16)
	if err := WriteFileAtomic(p, []byte(a), 0o600); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 50; i++ {
			s := a
			if i%2 == 1 {
				s = b
			}
			if err := WriteFileAtomic(p, []byte(s), 0o600); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := 0; i < 200; i++ {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if s := string(data); s != a && s != b {
			t.Fatalf("torn read of %d bytes", len(data))
		}
	}
	wg.Wait()
}

func TestLock(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lock")
	if _, held, err := HolderPID(p); held || err != nil {
		t.Fatalf("no lock file: held=%v err=%v", held, err)
	}
	l, err := Lock(p)
	if err != nil {
		t.Fatal(err)
	}
	pid, held, err := HolderPID(p)
	if err != nil || !held || pid != os.Getpid() {
		t.Errorf("HolderPID = %d %v %v", pid, held, err)
	}
	_, err = Lock(p)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second Lock: %v", err)
	}
	want := fmt.Sprintf("already running as pid %d", os.Getpid())
	if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), p) {
		t.Errorf("error %q lacks %q and the path", err, want)
	}
	if err := l.Unlock(); err != nil {
		t.Fatal(err)
	}
	if err := l.Unlock(); err != nil {
		t.Errorf("second Unlock: %v", err)
	}
	if _, held, _ := HolderPID(p); held {
		t.Error("lock still held after Unlock")
	}
	l2, err := Lock(p)
	if err != nil {
		t.Fatalf("relock after unlock: %v", err)
	}
	_ = l2.Unlock()
	if _, err := Lock(filepath.Join(p, "sub", "lock")); err == nil {
		t.Error("lock in a missing directory succeeded")
	}
}

func TestReadFileLimit(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("12345"), 0o600); err != nil {
		t.Fatal(err)
	}
	if data, err := ReadFileLimit(p, 5); err != nil || string(data) != "12345" {
		t.Fatalf("at the limit: %q %v", data, err)
	}
	if _, err := ReadFileLimit(p, 4); !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), p) {
		t.Fatalf("over the limit: %v", err)
	}
	// An endless file is cut at the limit, not read forever.
	if _, err := ReadFileLimit("/dev/zero", 1<<20); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("/dev/zero: %v", err)
	}
}

// HolderPID only asks: while it runs in a loop, Lock always succeeds (with
// flock, status took the lock for a moment and an agent starting then
// exited "already running").
func TestHolderPIDNeverTakesTheLock(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lock")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
				if _, _, err := HolderPID(p); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	for i := 0; i < 2000; i++ {
		l, err := Lock(p)
		if err != nil {
			close(stop)
			<-done
			t.Fatalf("Lock refused while status queried, attempt %d: %v", i, err)
		}
		_ = l.Unlock()
	}
	close(stop)
	<-done
}

// A lock handed over across exec stays held the whole time, and the new
// image adopts it.
func TestLockHandOverAcrossExec(t *testing.T) {
	if os.Getenv("FSUTIL_HANDOVER_CHILD") != "" {
		l, err := Lock(os.Getenv("FSUTIL_HANDOVER_CHILD"))
		if err != nil {
			fmt.Println("child:", err)
			os.Exit(1)
		}
		fmt.Println("child: adopted")
		_ = l.Unlock()
		os.Exit(0)
	}
	p := filepath.Join(t.TempDir(), "lock")
	l, err := Lock(p)
	if err != nil {
		t.Fatal(err)
	}
	env, err := l.HandOver()
	if err != nil {
		t.Fatal(err)
	}
	// A stranger is still refused after HandOver.
	if _, err := Lock(p); !errors.Is(err, ErrLocked) {
		t.Fatalf("stranger took a handed-over lock: %v", err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestLockHandOverAcrossExec$")
	cmd.Env = append(os.Environ(), env, "FSUTIL_HANDOVER_CHILD="+p)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "child: adopted") {
		t.Fatalf("child: %v\n%s", err, out)
	}
	_ = l.Unlock()
	// An inherited descriptor for another file is ignored, not adopted.
	t.Setenv(LockFDEnv, "0")
	l2, err := Lock(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	_ = l2.Unlock()
}

func TestWriteFileIfChanged(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if changed, err := WriteFileIfChanged(p, []byte("one"), 0o644); err != nil || !changed {
		t.Fatalf("new file: changed=%v %v", changed, err)
	}
	before, _ := os.Stat(p)
	if changed, err := WriteFileIfChanged(p, []byte("one"), 0o644); err != nil || changed {
		t.Fatalf("same content and mode: changed=%v %v", changed, err)
	}
	if after, _ := os.Stat(p); !os.SameFile(before, after) || !after.ModTime().Equal(before.ModTime()) {
		t.Fatal("an unchanged file was rewritten")
	}
	for _, c := range []struct {
		data string
		mode os.FileMode
	}{{"one", 0o600}, {"two", 0o600}, {"on", 0o600}, {"one plus", 0o600}} {
		if changed, err := WriteFileIfChanged(p, []byte(c.data), c.mode); err != nil || !changed {
			t.Fatalf("%q %o: changed=%v %v", c.data, c.mode, changed, err)
		}
		got, _ := os.ReadFile(p)
		st, _ := os.Stat(p)
		if string(got) != c.data || st.Mode().Perm() != c.mode {
			t.Fatalf("wrote %q %o, want %q %o", got, st.Mode().Perm(), c.data, c.mode)
		}
	}
	dir := filepath.Join(t.TempDir(), "d")
	os.Mkdir(dir, 0o755)
	if _, err := WriteFileIfChanged(dir, []byte("x"), 0o644); err == nil {
		t.Fatal("a directory in the way was not an error")
	}
}

// A link, hard link or FIFO planted at the lock's name is refused with a
// message naming it, and what it leads to is left as it was.
func TestLockRefusesPlantedFiles(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("precious\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	symlink, hardlink, fifo := filepath.Join(dir, "lock-symlink"), filepath.Join(dir, "lock-hardlink"), filepath.Join(dir, "lock-fifo")
	if err := os.Symlink(victim, symlink); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(victim, hardlink); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]string{symlink: "is a symbolic link", hardlink: "hard links", fifo: "not a regular file"} {
		l, err := Lock(p)
		if err == nil {
			l.Unlock()
			t.Errorf("Lock(%s) succeeded", p)
			continue
		}
		if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), p) {
			t.Errorf("Lock(%s): %v; want %q and the path", p, err, want)
		}
		if _, _, err := HolderPID(p); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("HolderPID(%s): %v; want %q", p, err, want)
		}
	}
	if data, _ := os.ReadFile(victim); string(data) != "precious\n" {
		t.Errorf("the link's target was written: %q", data)
	}
}

// The pid in the file is only a claim: HolderPID names it only when that
// process has the lock file open, so a forged pid is never signalled.
func TestHolderPIDIgnoresAForgedPID(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lock")
	l, err := Lock(p)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	// A longer pid left by an earlier holder is cut off, not kept.
	if err := os.WriteFile(p, []byte("1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	pid, held, err := HolderPID(p)
	if err != nil || !held || pid != 0 {
		t.Errorf("forged pid 1: pid %d held %v err %v; want 0, true, nil", pid, held, err)
	}
	if err := os.WriteFile(p, []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o600); err != nil {
		t.Fatal(err)
	}
	if pid, held, err := HolderPID(p); pid != os.Getpid() || !held || err != nil {
		t.Errorf("the true holder: pid %d held %v err %v", pid, held, err)
	}
}

// Lock overwrites a longer pid left in the file without leaving its tail.
func TestLockRewritesALongerPID(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lock")
	if err := os.WriteFile(p, []byte("1234567890123\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := Lock(p)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	if data, _ := os.ReadFile(p); string(data) != fmt.Sprintf("%d\n", os.Getpid()) {
		t.Errorf("lock file holds %q", data)
	}
}
