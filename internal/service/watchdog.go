package service

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/updatephase"
)

// Watchdog modes: the argument cron.sh takes (none for cron).
const (
	// ModePreStart is systemd's ExecStartPre: the rollback check and start
	// counting only, never a start.
	ModePreStart = "pre-start"
	// ModeWatch loops until no update is being confirmed.
	ModeWatch = "watch"
)

// WatchdogOptions tune the watchdog; the zero value of a field means its
// default. Only tests change them: the installer and the updater render
// the defaults (RenderWatchdog).
type WatchdogOptions struct {
	Interval  time.Duration // watch mode's pause between passes; default 2 s
	KillGrace time.Duration // SIGTERM → SIGKILL when stopping a rolled-back agent; default 10 s
	MaxStarts int           // starts of a new version that exit before it is rolled back; default 3
	WatchMax  time.Duration // watch mode gives up (leaving it to cron) after; default 24 h
	// VersionTimeout bounds the installed binary's `version --json`, which
	// a rollback asks first; default 10 s.
	VersionTimeout time.Duration

	// treatAsHost renders a temporary root as if it were the host's
	// (systemctl start allowed): tests record the calls with a fake
	// systemctl on PATH, never running the real one.
	treatAsHost bool
}

// Watchdog defaults.
const (
	DefaultWatchInterval  = 2 * time.Second
	DefaultKillGrace      = 10 * time.Second
	DefaultMaxStarts      = 3
	DefaultWatchMax       = 24 * time.Hour
	DefaultVersionTimeout = 10 * time.Second
)

// The bootstrap log is cut back to its last BootstrapLogKeep bytes once it
// is over BootstrapLogMax.
const (
	BootstrapLogMax  = 1 << 20
	BootstrapLogKeep = 256 << 10
)

// RenderWatchdog returns the watchdog script (Layout.CronScript) for l with
// the default options.
func RenderWatchdog(l config.Layout) []byte {
	return RenderWatchdogWith(l, WatchdogOptions{})
}

// RenderWatchdogWith returns the watchdog script for l with o. Every path
// is baked in as a host path, so the script needs neither the config nor
// the binary to run.
func RenderWatchdogWith(l config.Layout, o WatchdogOptions) []byte {
	args := RunArgs(l)
	for i, a := range args {
		args[i] = shellQuote(a)
	}
	return render("cron.sh.tmpl", map[string]string{
		"Binary":         shellQuote(l.Binary()),
		"OldBinary":      shellQuote(l.OldBinary()),
		"AgentLock":      shellQuote(l.LockFile()),
		"StateFile":      shellQuote(l.UpdateStateFile()),
		"StateLock":      shellQuote(stateLockPath(l.UpdateStateFile())),
		"WatchdogLock":   shellQuote(l.WatchdogLockFile()),
		"BootstrapLog":   shellQuote(l.BootstrapLog()),
		"SystemdRunDir":  shellQuote(l.SystemdRunDir()),
		"UnitFile":       shellQuote(l.UnitFile()),
		"UnitName":       shellQuote(UnitName),
		"AgentArgs":      strings.Join(args, " "),
		"MaxStarts":      strconv.Itoa(orDefault(o.MaxStarts, DefaultMaxStarts)),
		"KillGrace":      seconds(o.KillGrace, DefaultKillGrace),
		"WatchInterval":  seconds(o.Interval, DefaultWatchInterval),
		"WatchMax":       seconds(o.WatchMax, DefaultWatchMax),
		"VersionTimeout": seconds(o.VersionTimeout, DefaultVersionTimeout),
		"LogMax":         strconv.Itoa(BootstrapLogMax),
		"LogKeep":        strconv.Itoa(BootstrapLogKeep),
		// The phases the script reads and writes, from their one
		// definition (TestWatchdogSpellsNoPhase keeps literals out).
		"PhaseConfirming": shellQuote(string(updatephase.Confirming)),
		"PhaseRolledBack": shellQuote(string(updatephase.RolledBack)),
		"PhaseFailed":     shellQuote(string(updatephase.Failed)),
		// Systemctl's rule: the running systemd is asked to start the
		// unit only on the host's own root.
		"HostSystemd": shellQuote(map[bool]string{true: "1"}[l.Root().IsHost() || o.treatAsHost]),
	})
}

func orDefault(v, def int) int {
	if v <= 0 {
		return def
	}
	return v
}

// seconds renders d in whole seconds, at least 1 (sleep and date +%s
// count in seconds).
func seconds(d, def time.Duration) string {
	if d <= 0 {
		d = def
	}
	return strconv.Itoa(max(1, int(d.Round(time.Second)/time.Second)))
}

// EnsureWatchdog writes the watchdog script for l (mode 0755, atomically)
// unless it is already byte for byte what RenderWatchdog returns, and
// reports whether it wrote it. A confirmed update calls it, so that
// watchdog fixes ship with releases.
func EnsureWatchdog(l config.Layout) (changed bool, err error) {
	changed, err = fsutil.WriteFileIfChanged(l.CronScript(), RenderWatchdog(l), 0o755)
	if err != nil {
		return false, fmt.Errorf("watchdog: %w (is the state directory %s there? opsagent install creates it)", err, l.StateDir())
	}
	return changed, nil
}

// StartWatch starts `cron.sh watch` for l detached: in a session of its own
// and through an intermediate shell that exits at once, so the watchdog is
// nobody's child (no zombie of the agent's pid, which re-executes itself)
// and survives the agent. The updater calls it once the update state says
// "confirming" and before it hands its lock over (fsutil.LockFile.HandOver
// clears close-on-exec, and an inherited lock descriptor would keep the
// agent's lock held by the watchdog).
func StartWatch(l config.Layout) error {
	script := l.CronScript()
	if _, err := os.Stat(script); err != nil {
		return fmt.Errorf("start the watchdog: %w (opsagent install writes it)", err)
	}
	cmd := exec.Command("/bin/sh", "-c", `/bin/sh "$0" "$1" </dev/null >/dev/null 2>&1 &`, script, ModeWatch)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.WaitDelay = 5 * time.Second
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("start the watchdog %s watch: %w: %s", script, err, bytes.TrimSpace(out))
	}
	return nil
}

// StopWatchdogs stops every pass of l's watchdog that is running (a cron
// pass, or a watch started by the updater), so that none starts the agent
// again while it is being uninstalled; it returns how many it stopped. A
// pass is "/bin/sh <cron.sh> [mode]" exactly: the script's path alone
// decides, so an agent or watchdog of another root is never touched.
func StopWatchdogs(l config.Layout) int {
	script := []byte(l.CronScript())
	entries, _ := os.ReadDir("/proc")
	var stopped int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := bytes.Split(bytes.TrimSuffix(cmdline, []byte{0}), []byte{0})
		if len(args) < 2 || !bytes.HasSuffix(args[0], []byte("sh")) || !bytes.Equal(args[1], script) {
			continue
		}
		if syscall.Kill(pid, syscall.SIGTERM) == nil {
			stopped++
		}
	}
	return stopped
}

// HoldWatchdog takes the watchdog's lock (flock(2), as cron.sh takes it
// with flock(1)) so that no pass acts, e.g. starts the old binary, while
// a binary is swapped with no agent running. It waits up to wait for a
// pass in progress; release gives the lock back.
func HoldWatchdog(l config.Layout, wait time.Duration) (release func(), err error) {
	// Never through a link planted at the lock's name.
	f, err := fsutil.AppendFixedFile(l.WatchdogLockFile(), 0o600)
	if err != nil {
		return nil, fmt.Errorf("watchdog lock: %w", err)
	}
	deadline := time.Now().Add(wait)
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("watchdog lock %s: %w (a watchdog pass is still running)", l.WatchdogLockFile(), err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
