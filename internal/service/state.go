package service

import (
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/updatephase"
)

// UpdateState is the update in progress, or the last one, as recorded in
// the update-state file.
type UpdateState struct {
	// Phase is where the update stands: the watchdog acts on Confirming
	// alone and writes RolledBack or Failed; "" when no update was ever
	// recorded.
	Phase  updatephase.Phase
	From   string // the version being replaced
	To     string // the version being installed
	Reason string // why it failed or was rolled back
	// Deadline is when a confirming update is rolled back if the new
	// version has not confirmed (zero: no deadline). Whole seconds.
	Deadline time.Time
	// Starts counts starts of the new version by the watchdog (cron,
	// watch, systemd's pre-start) while confirming; the re-exec by the
	// updater itself is not counted. At 3 with the agent not running, the
	// watchdog rolls back.
	Starts  int
	Updated time.Time // when the state was last written. Whole seconds.
}

// maxStateFile bounds what ReadUpdateState reads: the file is a few
// hundred bytes.
const maxStateFile = 64 << 10

// stateLockWait is how long a writer waits for the state lock. The
// watchdog holds it for a read, a copy of the binary and a write.
const stateLockWait = 30 * time.Second

// stateLockPath is the flock that orders every change of the state file
// between the Go side and the watchdog. The state file itself cannot be
// the lock: each write renames a new file over it.
func stateLockPath(statePath string) string { return statePath + ".lock" }

// ReadUpdateState reads the update-state file at path. A missing file is
// the zero UpdateState and no error; unknown keys (a newer writer's) are
// ignored; the first of repeated keys wins, as with the shell's grep | head.
func ReadUpdateState(path string) (UpdateState, error) {
	data, err := fsutil.ReadFixedFile(path, maxStateFile)
	if errors.Is(err, fs.ErrNotExist) {
		return UpdateState{}, nil
	}
	if err != nil {
		return UpdateState{}, fmt.Errorf("update state %s: %w", path, err)
	}
	return parseUpdateState(path, string(data))
}

func parseUpdateState(path, data string) (UpdateState, error) {
	var s UpdateState
	seen := map[string]bool{}
	for i, line := range strings.Split(data, "\n") {
		if line == "" {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			return UpdateState{}, fmt.Errorf("update state %s: line %d has no '=' (delete the file to forget the update)", path, i+1)
		}
		if seen[key] {
			continue
		}
		seen[key] = true
		var err error
		switch key {
		case "phase":
			s.Phase = updatephase.Phase(val)
		case "from":
			s.From = val
		case "to":
			s.To = val
		case "reason":
			s.Reason = val
		case "deadline":
			s.Deadline, err = parseUnix(val)
		case "updated":
			s.Updated, err = parseUnix(val)
		case "starts":
			if val != "" {
				s.Starts, err = strconv.Atoi(val)
				if err == nil && s.Starts < 0 {
					err = errors.New("negative")
				}
			}
		}
		if err != nil {
			return UpdateState{}, fmt.Errorf("update state %s: line %d: %s=%q is not a number of seconds or starts (delete the file to forget the update)", path, i+1, key, val)
		}
	}
	return s, nil
}

func parseUnix(v string) (time.Time, error) {
	if v == "" || v == "0" {
		return time.Time{}, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		return time.Time{}, errors.New("bad time")
	}
	return time.Unix(n, 0), nil
}

func formatUnix(t time.Time) string {
	if t.IsZero() || t.Unix() <= 0 {
		return "0"
	}
	return strconv.FormatInt(t.Unix(), 10)
}

// marshal renders s as key=value lines, refusing a value that would not
// stay on its line.
func (s UpdateState) marshal() ([]byte, error) {
	if s.Starts < 0 {
		return nil, fmt.Errorf("update state: starts is %d; it counts starts, so it cannot be negative", s.Starts)
	}
	fields := []struct{ key, val string }{
		{"phase", string(s.Phase)}, {"from", s.From}, {"to", s.To}, {"reason", s.Reason},
		{"deadline", formatUnix(s.Deadline)}, {"starts", strconv.Itoa(s.Starts)}, {"updated", formatUnix(s.Updated)},
	}
	var b strings.Builder
	for _, f := range fields {
		if strings.ContainsAny(f.val, "\n\r\x00") {
			return nil, fmt.Errorf("update state: %s %q holds a line break or NUL; the file keeps one value per line, so pass a one-line value", f.key, f.val)
		}
		b.WriteString(f.key + "=" + f.val + "\n")
	}
	return []byte(b.String()), nil
}

// WriteUpdateState replaces the update-state file at path with s,
// atomically and with mode 0600, under the lock the watchdog takes, so
// that neither side's write is lost in the other's. Times are stored in
// whole seconds. A newline in a value is refused.
func WriteUpdateState(path string, s UpdateState) error {
	data, err := s.marshal()
	if err != nil {
		return fmt.Errorf("%w (writing %s)", err, path)
	}
	unlock, err := lockState(path)
	if err != nil {
		return err
	}
	defer unlock()
	return writeState(path, data)
}

func writeState(path string, data []byte) error {
	if err := fsutil.WriteFileAtomic(path, data, 0o600); err != nil {
		return fmt.Errorf("update state: %w", err)
	}
	return nil
}

// EditUpdateState reads, changes and writes the update state at path as
// one step under the watchdog's state lock: edit gets the current state
// (zero when there is none); when it returns an error nothing is written
// and the error is returned. It returns the state as written.
func EditUpdateState(path string, edit func(*UpdateState) error) (UpdateState, error) {
	unlock, err := lockState(path)
	if err != nil {
		return UpdateState{}, err
	}
	defer unlock()
	s, err := ReadUpdateState(path)
	if err != nil {
		return UpdateState{}, err
	}
	if err := edit(&s); err != nil {
		return s, err
	}
	data, err := s.marshal()
	if err != nil {
		return s, fmt.Errorf("%w (writing %s)", err, path)
	}
	return s, writeState(path, data)
}

// ErrNotConfirming is returned by ConfirmUpdate when the update is no
// longer being confirmed: typically the watchdog rolled it back just
// before, and the running binary is about to be replaced by the old one.
var ErrNotConfirming = errors.New("no update is being confirmed")

// ConfirmUpdate records that the new version (to) works: phase
// confirming → done. It refuses, with ErrNotConfirming, when the phase is
// anything else or names another version, so that a confirmation racing
// with a rollback never overwrites "rolled-back".
func ConfirmUpdate(path, to string, now time.Time) (UpdateState, error) {
	return EditUpdateState(path, func(s *UpdateState) error {
		if s.Phase != updatephase.Confirming || s.To != to {
			return fmt.Errorf("confirm version %s: %w (update state %s: phase %q, version %q%s)",
				to, ErrNotConfirming, path, s.Phase, s.To, reasonSuffix(s.Reason))
		}
		s.Phase, s.Reason, s.Updated = updatephase.Done, "", now
		return nil
	})
}

func reasonSuffix(r string) string {
	if r == "" {
		return ""
	}
	return ": " + r
}

// lockState takes the state lock beside path (flock(2), the lock flock(1)
// takes in the watchdog), waiting up to stateLockWait.
func lockState(path string) (unlock func(), err error) {
	lp := stateLockPath(path)
	// Never through a link planted at the lock's name.
	f, err := fsutil.AppendFixedFile(lp, 0o600)
	if err != nil {
		return nil, fmt.Errorf("update state lock: %w (is the state directory there? opsagent install creates it)", err)
	}
	deadline := time.Now().Add(stateLockWait)
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			_ = f.Close()
			return nil, fmt.Errorf("update state lock %s: %w", lp, err)
		}
		if time.Now().After(deadline) {
			_ = f.Close()
			return nil, fmt.Errorf("update state lock %s: held by another process for %v (a stuck cron.sh? see fuser %s)", lp, stateLockWait, lp)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
