package fsutil

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// readReturns runs read in a goroutine and fails when it does not return:
// a read that blocks on a FIFO would hang the test binary instead of
// failing it. The FIFO is then opened for writing and closed, which
// releases the blocked reader.
func readReturns(t *testing.T, fifo string, read func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- read() }()
	select {
	case err := <-done:
		return err
	case <-time.After(20 * time.Second):
		if w, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			w.Close()
		}
		t.Fatalf("reading %s blocked: a FIFO at a fixed path wedges the reader", fifo)
		return nil
	}
}

// TestReadFixedFileRefusesWhatIsNotARegularFile: a FIFO, a symbolic link,
// a device or a directory at one of the agent's own paths is refused at
// once, with an error that names the path and says what is there; a
// missing file stays os.ErrNotExist and a regular file reads as before.
func TestReadFixedFileRefusesWhatIsNotARegularFile(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "status.json")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	err := readReturns(t, fifo, func() error { _, err := ReadFixedFile(fifo, 1<<20); return err })
	if !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), fifo) || !strings.Contains(err.Error(), "named pipe (FIFO)") {
		t.Errorf("FIFO: %v", err)
	}
	if _, _, err := HolderPID(fifo); !errors.Is(err, ErrNotRegular) {
		t.Errorf("HolderPID on a FIFO: %v", err)
	}

	real := filepath.Join(dir, "real.conf")
	if err := os.WriteFile(real, []byte("[userdata]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if data, err := ReadFixedFile(real, 100); err != nil || string(data) != "[userdata]\n" {
		t.Errorf("regular file: %q %v", data, err)
	}
	if _, err := ReadFixedFile(real, 3); !errors.Is(err, ErrTooLarge) {
		t.Errorf("over the limit: %v", err)
	}
	link := filepath.Join(dir, "opsagent.conf")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFixedFile(link, 100); !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), "symbolic link") || !strings.Contains(err.Error(), link) {
		t.Errorf("symbolic link: %v", err)
	}
	for p, what := range map[string]string{"/dev/null": "a device", dir: "a directory"} {
		if _, err := ReadFixedFile(p, 100); !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), what) {
			t.Errorf("%s: %v", p, err)
		}
	}
	if _, err := ReadFixedFile(filepath.Join(dir, "missing"), 100); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

// TestWriteFileIfChangedOnAFIFO: bridge.py, cron.sh and the interpreter
// cache are compared with what is there before they are written; a FIFO
// there blocked the agent's start (and install) in that read. It is an
// error naming the path, and the FIFO is left alone.
func TestWriteFileIfChangedOnAFIFO(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bridge.py")
	if err := syscall.Mkfifo(p, 0o644); err != nil {
		t.Fatal(err)
	}
	err := readReturns(t, p, func() error { _, err := WriteFileIfChanged(p, []byte("print(1)\n"), 0o644); return err })
	if !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), p) {
		t.Errorf("WriteFileIfChanged over a FIFO: %v", err)
	}
	if fi, err := os.Lstat(p); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("the FIFO was replaced: %v %v", fi, err)
	}
}
