package agent

import (
	"fmt"
	"os"
	"time"

	"github.com/visualops/opsagent/agent/bridge"
	"github.com/visualops/opsagent/agent/conn"
	"github.com/visualops/opsagent/agent/native"
	"github.com/visualops/opsagent/agent/outbox"
	"github.com/visualops/opsagent/agent/rounds"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/protocol"
	saltbootstrap "github.com/visualops/opsagent/salt-bootstrap"
	"github.com/visualops/opsagent/updater"
)

// components are the read-only options each component gets from the
// config, converted in one place (the way Nomad's command/agent converts
// its file config for the client, convertClientConfig): components never
// hold a *config.Config. convertConfig is pure, so the mapping of every
// key is tested on its own (TestConvertConfig). What the config does not
// say (loggers, callbacks, the executor, the link, the process runner)
// the session adds.
type components struct {
	Engine config.Engine
	Outbox outbox.Options
	Native native.Options
	Salt   saltOptions
	Rounds rounds.Options
	Conn   conn.Options
	Update updater.Options
	// Raised names the pauses the config asked below config.MinPause and
	// that were raised to it, for the session to warn about.
	Raised []string
}

// saltOptions are the Salt executor's: its path (the states repository
// and the virtualenv) and its bridge.
type saltOptions struct {
	Path   saltbootstrap.PathOptions
	Bridge bridge.Options
}

// convertConfig converts c, for the installation l, into each
// component's options.
func convertConfig(l config.Layout, c *config.Config) components {
	var raised []string
	pause := func(key string, d time.Duration) time.Duration {
		p, up := config.Pause(d)
		if up {
			raised = append(raised, fmt.Sprintf("%s = %v raised to %v", key, d, p))
		}
		return p
	}
	var defMod *protocol.ModuleSource
	if c.Module.Repo != "" {
		defMod = &protocol.ModuleSource{Repo: c.Module.Repo, Tag: c.Module.Tag}
	}
	return components{
		Engine: c.Agent.Engine,
		Outbox: outbox.Options{Dir: l.OutboxDir(), MaxEntries: c.Agent.OutboxLimit, MaxBytes: int64(c.Agent.OutboxMaxBytes), MaxAge: c.Agent.OutboxMaxAge},
		Native: native.Options{Root: l.Root(), OutputLimit: c.Agent.OutputLimit, KillGrace: c.Agent.KillGrace, WatchDir: l.WatchDir(), StateDir: l.StateDir(), S3: native.S3Options{MetadataURL: c.Network.Metadata}},
		Salt: saltOptions{
			Path:   saltbootstrap.PathOptionsFrom(l, c),
			Bridge: bridge.Options{Script: l.BridgeScript(), WatchDir: l.WatchDir(), OSRoot: osRoot(l), KillGrace: c.Agent.KillGrace},
		},
		Rounds: rounds.Options{
			RoundDelay:    pause("[salt] delay", c.Salt.RoundDelay),
			RetryDelay:    pause("[agent] retry_delay", c.Agent.RetryDelay),
			StateTimeout:  c.Agent.StateTimeout,
			OutputLimit:   c.Agent.OutputLimit,
			DefaultModule: defMod,
		},
		Conn: conn.Options{
			URL:              c.Userdata.WSURI,
			CAFile:           rootedOrEmpty(l, c.Network.CAFile),
			AppNotReadyDelay: c.Agent.AppNotReadyDelay,
		},
		Update: updater.Options{Layout: l, HealthTimeout: c.Agent.UpdateHealthTimeout, EmbeddedKey: dist.EmbeddedPublicKey()},
		Raised: raised,
	}
}

// rootedOrEmpty maps an instance path of the config below the root ("" stays "").
func rootedOrEmpty(l config.Layout, p string) string {
	if p == "" {
		return ""
	}
	return l.Host(p)
}

// osRoot is where the bridge reads etc/os-release (the adaptor needs the
// OS type): the root when it has one (a real instance, or a test that
// gives one), else the host's, so that a test root without an
// /etc/os-release still names a real OS.
func osRoot(l config.Layout) string {
	if _, err := os.Stat(l.OSReleaseFile()); err == nil {
		return l.Root().Dir()
	}
	return "/"
}
