// Package updatephase names where a self-update stands: the one
// definition of each phase, which the updater writes, the status file
// and `opsagent update` show, the update-state file records, and the
// watchdog (cron.sh, plain shell) compares against. cron.sh gets the
// names it uses rendered from these constants (service.RenderWatchdog),
// never as literals, so that the Go side and the shell cannot drift: a
// phase the shell spelled differently would roll back a good release or
// keep a bad one.
//
// It imports nothing, so that every package of the update flow can use
// it (internal/service below the updater, the agent, the CLI).
package updatephase

// Phase is one step of a self-update.
type Phase string

// The phases in the order an update goes through them. The first six are
// this process's own (status only); the others are also recorded in the
// update-state file that the watchdog shares.
const (
	Downloading  Phase = "downloading"   // the release is being fetched (with bytes and total)
	Verifying    Phase = "verifying"     // its minisign signature is checked
	Extracting   Phase = "extracting"    // this architecture's binary is taken out of the tarball
	SmokeTesting Phase = "smoke-testing" // the new binary's `version --json` is run
	Ready        Phase = "ready"         // prepared; installed between rounds
	Swapping     Phase = "swapping"      // the binaries are being swapped
	// Confirming: the new binary is in place and must confirm (its first
	// accepted Handshake) before the deadline, or the watchdog rolls it
	// back. The watchdog acts on this phase alone.
	Confirming Phase = "confirming"
	Done       Phase = "done"        // the new version confirmed
	RolledBack Phase = "rolled-back" // the watchdog restored the previous binary (update state)
	Failed     Phase = "failed"      // the swap failed, or the update could not take effect (update state)
	Refused    Phase = "refused"     // the release was not applied: the running binary is unchanged (status only)
)

// All lists every phase, in the order above.
func All() []Phase {
	return []Phase{Downloading, Verifying, Extracting, SmokeTesting, Ready, Swapping, Confirming, Done, RolledBack, Failed, Refused}
}

// Unsuccessful reports whether p ends an update that did not take: the
// binary that runs is the one it would have replaced (Refused,
// RolledBack, Failed).
func (p Phase) Unsuccessful() bool {
	return p == Refused || p == RolledBack || p == Failed
}

func (p Phase) String() string { return string(p) }
