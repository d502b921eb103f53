package backend

import (
	"strconv"

	"github.com/visualops/opsagent/internal/textcut"
)

// maxLogString bounds each client-supplied string that goes into a log
// line, so that neither an agent nor an unauthenticated socket can make
// the backend write long lines (a 1 MiB instance id, a 64 KiB comment).
const maxLogString = 64

// clip makes a client-supplied string fit a log line: at most
// maxLogString bytes of it, cut on a character boundary, followed when cut
// by "…(N bytes)", N being its whole length. Every log line of this
// package passes such strings through clip, unless the backend has already
// checked them (a registered connection's instance and app ids: at most
// 128 bytes of a safe alphabet, kept whole as operators search by them).
func clip(s string) string {
	if len(s) <= maxLogString {
		return s
	}
	return textcut.Prefix(s, maxLogString) + "…(" + strconv.Itoa(len(s)) + " bytes)"
}
