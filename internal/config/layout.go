package config

import (
	"io/fs"
	"path/filepath"

	"github.com/visualops/opsagent/internal/fsutil"
)

// Layout answers where every file of one installation lives, as host
// paths below the root (spec/install-update.md, "Layout"). It is the only
// place that knows those paths: the agent, `status`, the installer and
// the updater all ask it. Paths the config can move ([global] conf_path,
// envroot, …) come from the config; the others are fixed.
type Layout struct {
	root       fsutil.Root
	configFile string
	g          Global
	m          Module
}

// Fixed instance paths (not settable in the config).
const (
	optDir     = "/opt/visualops"
	binDir     = "/opt/visualops/bin"
	cronEntry  = "/etc/cron.d/opsagent"
	unitFile   = "/etc/systemd/system/opsagent.service"
	machineID  = "/etc/machine-id"
	binaryName = "opsagent"
	osRelease  = "/etc/os-release"
	systemdRun = "/run/systemd/system"
)

// NewLayout returns the layout of root with the paths of c (nil: the
// defaults). configFile is the config's host path; "" means the default
// /etc/opsagent.conf below root.
func NewLayout(root fsutil.Root, configFile string, c *Config) Layout {
	if c == nil {
		c = Default()
	}
	if configFile == "" {
		configFile = root.Path(DefaultPath)
	}
	return Layout{root: root, configFile: configFile, g: c.Global, m: c.Module}
}

// Root is the root every path is below.
func (l Layout) Root() fsutil.Root { return l.root }

// ConfigFile is /etc/opsagent.conf (or the file --config named).
func (l Layout) ConfigFile() string { return l.configFile }

// Host maps any instance path below the root.
func (l Layout) Host(instancePath string) string { return l.root.Path(instancePath) }

// StateDir holds generated files ([global] conf_path), mode 0700.
func (l Layout) StateDir() string { return l.root.Path(l.g.StateDir) }

func (l Layout) state(name string) string { return filepath.Join(l.StateDir(), name) }

// LockFile is the single-instance lock (with the agent's pid).
func (l Layout) LockFile() string { return l.state("lock") }

// RecipeFile is the persisted recipe.
func (l Layout) RecipeFile() string { return l.state("recipe.json") }

// PendingUpdateFile is an AgentUpdate received but not applied yet.
func (l Layout) PendingUpdateFile() string { return l.state("pending-update.json") }

// UpdateStateFile records an update in progress (phase, deadline, starts,
// reason) as key=value lines, shared by the updater, the new binary, the
// shell watchdog and `status`.
func (l Layout) UpdateStateFile() string { return l.state("update.state") }

// UpdateRequestFile is what `opsagent update` leaves for a running agent.
func (l Layout) UpdateRequestFile() string { return l.state("update-request.json") }

// DownloadDir holds update downloads (the .unverified tarball).
func (l Layout) DownloadDir() string { return l.state("update") }

// StatusFile is what `opsagent status` reads.
func (l Layout) StatusFile() string { return l.state("status.json") }

// OutboxDir holds the durable outbox of StateLogs.
func (l Layout) OutboxDir() string { return l.state("outbox") }

// BridgeScript is bridge.py, written out from the binary at start.
func (l Layout) BridgeScript() string { return l.state("bridge.py") }

// CronScript is the watchdog the cron entry runs.
func (l Layout) CronScript() string { return l.state("cron.sh") }

// WatchdogLockFile keeps a cron pass and a watch pass of the watchdog from
// acting at once.
func (l Layout) WatchdogLockFile() string { return l.CronScript() + ".lock" }

// WatchDir keeps checksums of watched files ([global] watch).
func (l Layout) WatchDir() string { return l.root.Path(l.g.WatchDir) }

// TokenFile is the instance token ([global] token), mode 0400.
func (l Layout) TokenFile() string { return l.root.Path(l.g.TokenFile) }

// VenvDir is the Python virtualenv ([global] envroot).
func (l Layout) VenvDir() string { return l.root.Path(l.g.VenvDir) }

// ReposDir is where states repositories are cloned ([module] root).
func (l Layout) ReposDir() string { return l.root.Path(l.m.ReposDir) }

// StatesDir is the states repository clone ([module] root + name).
func (l Layout) StatesDir() string { return filepath.Join(l.ReposDir(), l.m.RepoName) }

// StatesStampFile records what the clone holds (repo, tag, commit).
func (l Layout) StatesStampFile() string { return l.StatesDir() + ".state.json" }

// LogDir holds the logs ([global] log_path), mode 0750.
func (l Layout) LogDir() string { return l.root.Path(l.g.LogDir) }

// LogFile is agent.log ([global] logfile).
func (l Layout) LogFile() string { return l.root.Path(l.g.LogFile) }

// BootstrapLog is what the userdata script and the installer write.
func (l Layout) BootstrapLog() string { return filepath.Join(l.LogDir(), "bootstrap.log") }

// OptDir is /opt/visualops, everything uninstall removes.
func (l Layout) OptDir() string { return l.root.Path(optDir) }

// BinDir holds the binary and its previous version.
func (l Layout) BinDir() string { return l.root.Path(binDir) }

// Binary is the installed agent, /opt/visualops/bin/opsagent.
func (l Layout) Binary() string { return filepath.Join(l.BinDir(), binaryName) }

// OldBinary is the previous version, kept for rollback.
func (l Layout) OldBinary() string { return l.Binary() + ".old" }

// CmdCwd is linux.cmd's default working directory (module.json), an
// instance path: the native module maps it below the root itself.
const CmdCwd = "/opt/visualops/tmp"

// CronEntry is the agent's file in /etc/cron.d.
func (l Layout) CronEntry() string { return l.root.Path(cronEntry) }

// UnitFile is the systemd unit.
func (l Layout) UnitFile() string { return l.root.Path(unitFile) }

// SystemdRunDir exists when systemd is the running init.
func (l Layout) SystemdRunDir() string { return l.root.Path(systemdRun) }

// MachineIDFile is /etc/machine-id, the instance id of last resort.
func (l Layout) MachineIDFile() string { return l.root.Path(machineID) }

// OSReleaseFile is /etc/os-release.
func (l Layout) OSReleaseFile() string { return l.root.Path(osRelease) }

// Dir is a directory of the layout with its mode.
type Dir struct {
	Path string
	Mode fs.FileMode
	What string // names it in messages
	// Agent: the agent writes there and creates it at start when it is
	// missing (the installer creates every one).
	Agent bool
}

// Dirs is the one table of the layout's directories and their modes: the
// installer creates and repairs each one, the agent those it writes to.
func (l Layout) Dirs() []Dir {
	return []Dir{
		{l.OptDir(), 0o755, "/opt/visualops", false},
		{l.BinDir(), 0o755, "the binary's directory", false},
		{l.StateDir(), 0o700, "the state directory ([global] conf_path)", true},
		{l.WatchDir(), 0o700, "[global] watch", true},
		{l.LogDir(), 0o750, "the log directory ([global] log_path)", true},
		{filepath.Dir(l.ConfigFile()), 0o755, "the config's directory", false},
		{filepath.Dir(l.TokenFile()), 0o755, "the token's directory", false},
	}
}
