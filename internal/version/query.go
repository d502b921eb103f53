package version

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/visualops/opsagent/internal/proc"
)

// QueryTimeout bounds Query: `version --json` answers at once, so a binary
// that takes longer is hung or not opsagent.
const QueryTimeout = 30 * time.Second

// maxQueryOutput bounds what is kept of its output: the JSON is a few
// hundred bytes, and a binary that prints without end must not be read
// whole.
const maxQueryOutput = 64 << 10

// Query runs bin's `version --json` and returns the version it reports:
// the one way the updater (smoke-testing a new release) and the installer
// (deciding whether to keep a newer installed binary) ask a binary what
// it is. Only the standard output is parsed; the first line of standard
// error is quoted in the error when it fails. It is bounded in time and
// output, runs with a plain PATH, and an error says why the binary does
// not count as opsagent: it does not run, exits non-zero, or prints no
// version.
func Query(ctx context.Context, r proc.Runner, bin string) (string, error) {
	var stderr boundedBuffer
	res, err := r.Run(ctx, proc.Cmd{Path: bin, Args: []string{"version", "--json"}, Timeout: QueryTimeout,
		Env: []string{"PATH=/usr/bin:/bin"}, Stderr: &stderr, OutputLimit: maxQueryOutput})
	if err != nil {
		return "", fmt.Errorf("it does not run: %w%s", err, stderr.firstLine())
	}
	if res.ExitCode != 0 {
		return "", fmt.Errorf("'version --json' exited %d%s", res.ExitCode, stderr.firstLine())
	}
	var info struct{ Version string }
	if err := json.Unmarshal([]byte(res.Output), &info); err != nil || info.Version == "" {
		return "", fmt.Errorf("'version --json' printed no version%s", stderr.firstLine())
	}
	return info.Version, nil
}

// boundedBuffer keeps the first 4 KiB written to it (standard error, for
// a message) and drops the rest.
type boundedBuffer struct{ b []byte }

func (w *boundedBuffer) Write(p []byte) (int, error) {
	if room := 4<<10 - len(w.b); room > 0 {
		w.b = append(w.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

// firstLine is ": <the first line of standard error>", or "".
func (w *boundedBuffer) firstLine() string {
	line, _, _ := strings.Cut(strings.TrimSpace(string(w.b)), "\n")
	if line == "" {
		return ""
	}
	return ": " + line
}
