package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/service"
	"github.com/visualops/opsagent/protocol"
	"github.com/visualops/opsagent/updater"
)

// UpdateRequest is what `opsagent update` leaves for the running agent
// (next to its lock, then SIGUSR1): the agent hands it to the round engine
// like an AgentUpdate, so it waits for the round to end, but with the
// permissions only a person at the instance may give.
type UpdateRequest struct {
	Version               string `json:"version"`
	URL                   string `json:"url,omitempty"`
	Force                 bool   `json:"force,omitempty"`
	InsecureSkipSignature bool   `json:"insecure_skip_signature,omitempty"`
}

// WriteUpdateRequest stores a request for the running agent.
func WriteUpdateRequest(l config.Layout, r UpdateRequest) error {
	data, _ := json.Marshal(r)
	return fsutil.WriteFileAtomic(l.UpdateRequestFile(), data, 0o600)
}

// takeUpdateRequest reads and removes the pending request, if any.
func takeUpdateRequest(l config.Layout) (*UpdateRequest, error) {
	p := l.UpdateRequestFile()
	data, err := fsutil.ReadFixedFile(p, 64<<10)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	_ = os.Remove(p)
	var r UpdateRequest
	if err := json.Unmarshal(data, &r); err != nil || r.Version == "" {
		return nil, fmt.Errorf("update request %s is not valid: %v", p, err)
	}
	return &r, nil
}

// selfUpdate adapts the updater to the round engine and keeps what status
// shows of an update.
type selfUpdate struct {
	u   *updater.Updater
	log *slog.Logger

	owner       *config.Owner
	configFile  string
	embeddedKey string

	mu     sync.Mutex
	manual map[string]UpdateRequest // version → a person's request (force, …)
	last   updater.Step
}

// UpdateStatus is what status shows of the last or current update.
type UpdateStatus struct {
	Phase   string `json:"phase,omitempty"`
	Version string `json:"version,omitempty"`
	From    string `json:"from,omitempty"`
	Bytes   int64  `json:"bytes,omitempty"`
	Total   int64  `json:"total,omitempty"`
	Reason  string `json:"reason,omitempty"`
}

func newSelfUpdate(l config.Layout, owner *config.Owner, current, target string, log *slog.Logger) *selfUpdate {
	su := &selfUpdate{log: log, manual: map[string]UpdateRequest{}, owner: owner, configFile: l.ConfigFile(), embeddedKey: dist.EmbeddedPublicKey()}
	cur := owner.Current()
	su.u = updater.New(updater.Options{
		Layout: l, Current: current, Target: target,
		Settings:      owner.Current,
		EmbeddedKey:   su.embeddedKey,
		HealthTimeout: cur.Agent.UpdateHealthTimeout,
		Logger:        log,
		OnStep: func(s updater.Step) {
			su.mu.Lock()
			su.last = s
			su.mu.Unlock()
		},
	})
	return su
}

// keyProblem says what is wrong with [userdata] pubkey ("" when nothing),
// for the session to report once (log, status and the Handshake's
// init_errors): a malformed key is skipped when updates are verified, and
// the compiled-in release key still verifies them.
func (s *selfUpdate) keyProblem() string {
	return keyProblem(s.owner.Current(), s.configFile, s.embeddedKey)
}

func keyProblem(cfg *config.Config, configFile, embedded string) string {
	if strings.TrimSpace(cfg.Userdata.PubKey) == "" {
		return ""
	}
	if _, err := dist.ParsePublicKey(cfg.Userdata.PubKey); err != nil {
		still := "updates are verified with the release key compiled into this binary only"
		if embedded == "" {
			still = "this binary has no compiled-in release key, so every update is refused until it is fixed"
		}
		return fmt.Sprintf("config %s: [userdata] pubkey is ignored: %v; %s (set it to the base64 line of the release minisign.pub, e.g. re-run the userdata or opsagent install --pubkey)", configFile, err, still)
	}
	return ""
}

// Prepare is rounds.Updater: an AgentUpdate (or a person's request for
// that version) downloaded, verified and smoke-tested in the background.
func (s *selfUpdate) Prepare(ctx context.Context, au protocol.AgentUpdate) (rounds.Prepared, error) {
	req := updater.Request{Version: au.Version, URL: au.URL}
	s.mu.Lock()
	if m, ok := s.manual[au.Version]; ok {
		req.Force, req.InsecureSkipSignature = m.Force, m.InsecureSkipSignature
		if m.URL != "" {
			req.URL = m.URL
		}
		delete(s.manual, au.Version)
	}
	s.mu.Unlock()
	p, err := s.u.Prepare(ctx, req)
	if err != nil {
		if ctx.Err() == nil { // not replaced or stopped: refused
			s.refused(au.Version, err)
		}
		return nil, err
	}
	return &preparedUpdate{s: s, p: p}, nil
}

func (s *selfUpdate) refused(version string, err error) {
	s.mu.Lock()
	s.last = updater.Step{Phase: "refused", Version: version, Reason: err.Error()}
	s.mu.Unlock()
}

// preparedUpdate is rounds.Prepared.
type preparedUpdate struct {
	s *selfUpdate
	p *updater.Prepared
}

func (p *preparedUpdate) Install() (*rounds.Restart, error) {
	r, err := p.p.Install()
	if err != nil {
		p.s.refused(p.p.Version, err)
		return nil, err
	}
	return &rounds.Restart{Binary: r.Binary, Version: r.Version}, nil
}

func (p *preparedUpdate) Discard() { p.p.Discard() }

// request records a person's request and returns the AgentUpdate to hand
// to the engine (DeliverUpdateByHand).
func (s *selfUpdate) request(r UpdateRequest) *protocol.AgentUpdate {
	s.mu.Lock()
	s.manual[r.Version] = r
	s.mu.Unlock()
	return &protocol.AgentUpdate{Version: r.Version, URL: r.URL}
}

func (s *selfUpdate) status() updater.Step {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// confirmation is the new version's side of an update: after its first
// accepted Handshake it records the update as done, rewrites the version
// in the config and the watchdog (so watchdog fixes ship with releases),
// and says "updated from X to Y". A rollback done by the watchdog is
// reported instead (status and the next Handshake's init_errors).
type confirmation struct {
	layout  config.Layout
	owner   *config.Owner
	version string
	log     *slog.Logger

	once  sync.Once
	mu    sync.Mutex
	state service.UpdateState
}

func newConfirmation(l config.Layout, owner *config.Owner, version string, log *slog.Logger) *confirmation {
	st, err := service.ReadUpdateState(service.UpdateStatePath(l))
	if err != nil {
		log.Warn("update state unreadable; ignored", "err", err)
	}
	return &confirmation{layout: l, owner: owner, version: version, log: log, state: st}
}

// pending reports whether this run is a new version to confirm.
func (c *confirmation) pending() bool {
	st := c.status()
	return st.Phase == service.PhaseConfirming && st.To == c.version
}

// initError is the update problem to report to the backend, if any.
func (c *confirmation) initError() string {
	st := c.status()
	switch st.Phase {
	case service.PhaseRolledBack:
		return fmt.Sprintf("update from %s to %s rolled back: %s", st.From, st.To, st.Reason)
	case service.PhaseFailed:
		return fmt.Sprintf("update to %s failed: %s", st.To, st.Reason)
	}
	return ""
}

// established is called once the backend accepted a Handshake.
func (c *confirmation) established() {
	if !c.pending() {
		return
	}
	c.once.Do(func() {
		st, err := service.ConfirmUpdate(service.UpdateStatePath(c.layout), c.version, time.Now())
		if err != nil {
			c.log.Error("cannot record the update as confirmed; the watchdog may roll it back", "err", err)
			return
		}
		c.mu.Lock()
		c.state = st
		c.mu.Unlock()
		c.log.Info(fmt.Sprintf("updated from %s to %s", st.From, st.To))
		if _, err := c.owner.Update(func(cfg *config.Config) error { cfg.Userdata.Version = c.version; return nil }); err != nil {
			c.log.Error("cannot write [userdata] version", "err", err)
		}
		if changed, err := service.EnsureWatchdog(c.layout); err != nil {
			c.log.Warn("cannot rewrite the watchdog", "err", err)
		} else if changed {
			c.log.Info("watchdog rewritten by the new version", "script", c.layout.CronScript())
		}
	})
}

// status is the update's state for the status file.
func (c *confirmation) status() service.UpdateState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}
