package agent

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/updater"
)

// The conversion on its own: every key a component uses reaches its
// option, instance paths mapped below the root, pauses raised to their
// floor and named.
func TestConvertConfig(t *testing.T) {
	root, _ := fsutil.NewRoot(t.TempDir())
	c, err := config.Parse("/etc/opsagent.conf", []byte(`[userdata]
ws_uri = wss://backend.example/agent/
app_id = app-1
base_remote = https://releases.example/opsagent
pubkey = RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3
[module]
mod_repo = https://git.example/salt.git
mod_tag = v1
bootstrap = scripts/boot.sh
[network]
ca_file = /etc/ssl/extra.pem
[salt]
delay = 0
wheelhouse = /srv/wheels
python = /usr/bin/python2.7
[agent]
engine = Native
retry_delay = 45s
state_timeout = 5m
kill_grace = 3s
app_not_ready_delay = 7s
update_health_timeout = 90s
outbox_limit = 123
outbox_max_bytes = 1MiB
outbox_max_age = 2h
output_limit = 2048
`))
	if err != nil {
		t.Fatal(err)
	}
	l := config.NewLayout(root, "", c)
	o := convertConfig(l, c)
	checks := []struct {
		name      string
		got, want any
	}{
		{"engine", o.Engine, config.EngineNative},
		{"outbox dir", o.Outbox.Dir, l.OutboxDir()},
		{"outbox_limit", o.Outbox.MaxEntries, 123},
		{"outbox_max_bytes", o.Outbox.MaxBytes, int64(1 << 20)},
		{"outbox_max_age", o.Outbox.MaxAge, 2 * time.Hour},
		{"native root", o.Native.Root, root},
		{"native output_limit", o.Native.OutputLimit, 2048},
		{"native kill_grace", o.Native.KillGrace, 3 * time.Second},
		{"native watch", o.Native.WatchDir, l.WatchDir()},
		{"salt python (a host path)", o.Salt.Path.Python, "/usr/bin/python2.7"},
		{"salt wheelhouse (below the root)", o.Salt.Path.Wheelhouse, root.Path("/srv/wheels")},
		{"module bootstrap", o.Salt.Path.BootstrapScript, "scripts/boot.sh"},
		{"bridge script", o.Salt.Bridge.Script, l.BridgeScript()},
		{"bridge kill_grace", o.Salt.Bridge.KillGrace, 3 * time.Second},
		{"salt delay (raised)", o.Rounds.RoundDelay, config.MinPause},
		{"retry_delay", o.Rounds.RetryDelay, 45 * time.Second},
		{"state_timeout", o.Rounds.StateTimeout, 5 * time.Minute},
		{"rounds output_limit", o.Rounds.OutputLimit, 2048},
		{"mod_repo", o.Rounds.DefaultModule.Repo, "https://git.example/salt.git"},
		{"mod_tag", o.Rounds.DefaultModule.Tag, "v1"},
		{"ws_uri", o.Conn.URL, "wss://backend.example/agent/"},
		{"ca_file (below the root)", o.Conn.CAFile, filepath.Join(root.Dir(), "etc/ssl/extra.pem")},
		{"app_not_ready_delay", o.Conn.AppNotReadyDelay, 7 * time.Second},
		{"update_health_timeout", o.Update.HealthTimeout, 90 * time.Second},
		{"update layout", o.Update.Layout, l},
		{"base_remote", updater.SourceOf(c).BaseRemote, "https://releases.example/opsagent"},
		{"pubkey", updater.SourceOf(c).TrustedKeys[0], c.Userdata.PubKey},
	}
	for _, ck := range checks {
		if ck.got != ck.want {
			t.Errorf("%s: %v, want %v", ck.name, ck.got, ck.want)
		}
	}
	if len(o.Raised) != 1 || !strings.Contains(o.Raised[0], "[salt] delay") {
		t.Errorf("raised pauses: %q, want [salt] delay named", o.Raised)
	}
	// Nothing configured: no default module, no CA file.
	d := convertConfig(config.NewLayout(root, "", nil), config.Default())
	if d.Rounds.DefaultModule != nil || d.Conn.CAFile != "" || d.Salt.Path.Wheelhouse != "" || d.Engine != config.EngineAuto {
		t.Errorf("defaults: module %v, ca %q, wheelhouse %q, engine %q", d.Rounds.DefaultModule, d.Conn.CAFile, d.Salt.Path.Wheelhouse, d.Engine)
	}
}
