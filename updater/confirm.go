package updater

import (
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/service"
	"github.com/visualops/opsagent/internal/updatephase"
)

// Confirmation is the new version's side of an update: after its first
// accepted Handshake it records the update as done, has the version
// written to the config and rewrites the watchdog (so that watchdog fixes
// ship with releases), and says "updated from X to Y". A rollback done by
// the watchdog is reported instead (status and the next Handshake's
// init_errors).
type Confirmation struct {
	layout  config.Layout
	version string
	log     *slog.Logger
	// recordVersion writes [userdata] version (through the config's
	// Owner: the updater never holds the config).
	recordVersion func(version string) error

	once  sync.Once
	mu    sync.Mutex
	state service.UpdateState
}

// NewConfirmation reads the update state for the running version.
func NewConfirmation(l config.Layout, version string, log *slog.Logger, recordVersion func(string) error) *Confirmation {
	st, err := service.ReadUpdateState(l.UpdateStateFile())
	if err != nil {
		log.Warn("update state unreadable; ignored", "err", err)
	}
	return &Confirmation{layout: l, version: version, log: log, recordVersion: recordVersion, state: st}
}

// Pending reports whether this run is a new version to confirm.
func (c *Confirmation) Pending() bool {
	st := c.State()
	return st.Phase == updatephase.Confirming && st.To == c.version
}

// InitError is the update problem to report to the backend, if any.
func (c *Confirmation) InitError() string {
	st := c.State()
	switch st.Phase {
	case updatephase.RolledBack:
		return fmt.Sprintf("update from %s to %s rolled back: %s", st.From, st.To, st.Reason)
	case updatephase.Failed:
		return fmt.Sprintf("update to %s failed: %s", st.To, st.Reason)
	}
	return ""
}

// Established is called once the backend accepted a Handshake.
func (c *Confirmation) Established() {
	if !c.Pending() {
		return
	}
	c.once.Do(func() {
		st, err := service.ConfirmUpdate(c.layout.UpdateStateFile(), c.version, time.Now())
		if err != nil {
			c.log.Error("cannot record the update as confirmed; the watchdog may roll it back", "err", err)
			return
		}
		c.mu.Lock()
		c.state = st
		c.mu.Unlock()
		c.log.Info(fmt.Sprintf("updated from %s to %s", st.From, st.To))
		if err := c.recordVersion(c.version); err != nil {
			c.log.Error("cannot write [userdata] version", "err", err)
		}
		if changed, err := service.EnsureWatchdog(c.layout); err != nil {
			c.log.Warn("cannot rewrite the watchdog", "err", err)
		} else if changed {
			c.log.Info("watchdog rewritten by the new version", "script", c.layout.CronScript())
		}
	})
}

// State is the update's state for the status file.
func (c *Confirmation) State() service.UpdateState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// KeyProblem says what is wrong with the configured release key pubkey
// ([userdata] pubkey of configFile; "" when nothing), for the agent to
// report once (log, status and the Handshake's init_errors): a malformed
// key is skipped when updates are verified, and the compiled-in release
// key (embedded) still verifies them.
func KeyProblem(pubkey, configFile, embedded string) string {
	if strings.TrimSpace(pubkey) == "" {
		return ""
	}
	if _, err := dist.ParsePublicKey(pubkey); err != nil {
		still := "updates are verified with the release key compiled into this binary only"
		if embedded == "" {
			still = "this binary has no compiled-in release key, so every update is refused until it is fixed"
		}
		return fmt.Sprintf("config %s: [userdata] pubkey is ignored: %v; %s (set it to the base64 line of the release minisign.pub, e.g. re-run the userdata or opsagent install --pubkey)", configFile, err, still)
	}
	return ""
}
