package installer

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/visualops/opsagent/internal/textcut"
)

// Outcome of one step.
type Outcome int

const (
	Unchanged Outcome = iota // already as it should be
	Changed                  // created, repaired or updated
	Skipped                  // not applicable here (e.g. no systemd)
	Failed                   // did not work; the line says what to do
	Planned                  // --dry-run: would change
)

// Line is one step's report.
type Line struct {
	Step    string
	Outcome Outcome
	Detail  string
}

// reporter prints one line per step for a person: a ✓ or ✗ on a
// terminal, timestamped plain lines otherwise, and appends the same
// timestamped lines to bootstrap.log.
type reporter struct {
	mu       sync.Mutex
	out      io.Writer
	terminal bool
	// logTo appends a line to bootstrap.log; nil when nothing may be
	// written (--dry-run, or the caller logs the output already).
	logTo func(line string)
	now   func() time.Time
	lines []Line
}

// add records and prints one step's line. Details carry text from
// elsewhere (a states repository's bootstrap.sh, pip, a package manager,
// a config value): textcut.Printable keeps it from driving the terminal
// or forging lines in bootstrap.log.
func (r *reporter) add(step string, o Outcome, format string, a ...any) {
	l := Line{Step: step, Outcome: o, Detail: textcut.Printable(fmt.Sprintf(format, a...))}
	r.mu.Lock()
	r.lines = append(r.lines, l)
	r.mu.Unlock()
	r.print(l)
}

func (r *reporter) print(l Line) {
	mark, word := "✓", "ok"
	switch l.Outcome {
	case Changed:
		word = "changed"
	case Skipped:
		mark, word = "-", "skipped"
	case Failed:
		mark, word = "✗", "FAILED"
	case Planned:
		mark, word = "→", "would"
	}
	stamp := r.now().UTC().Format(time.RFC3339)
	plain := fmt.Sprintf("%s %-7s %-12s %s", stamp, word, l.Step, l.Detail)
	if r.terminal {
		fmt.Fprintf(r.out, "%s %-12s %s\n", mark, l.Step, l.Detail)
	} else {
		fmt.Fprintln(r.out, plain)
	}
	r.log(plain)
}

// note prints a line that is not a step (the summary).
func (r *reporter) note(msg string) {
	msg = textcut.Printable(msg)
	stamp := r.now().UTC().Format(time.RFC3339)
	if r.terminal {
		fmt.Fprintln(r.out, msg)
	} else {
		fmt.Fprintf(r.out, "%s %s\n", stamp, msg)
	}
	r.log(stamp + " " + msg)
}

func (r *reporter) log(line string) {
	if r.logTo != nil {
		r.logTo("opsagent install: " + strings.TrimSpace(line))
	}
}

// count reports how many steps had each outcome.
func (r *reporter) count(o Outcome) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, l := range r.lines {
		if l.Outcome == o {
			n++
		}
	}
	return n
}
