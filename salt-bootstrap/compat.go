package saltbootstrap

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// checkCompat applies compat.txt: every "<op> <version>" line must hold
// for the agent version. A missing file is compatible (with a warning).
func (f *Fetcher) checkCompat() error {
	data, err := os.ReadFile(filepath.Join(f.opts.Dir, "compat.txt"))
	if errors.Is(err, os.ErrNotExist) {
		f.log.Warn("states repository has no compat.txt; assuming it is compatible")
		return nil
	}
	if err != nil {
		return &Error{Comment: fmt.Sprintf("States compat.txt unreadable: %v", err), Err: err}
	}
	ok, err := Compatible(string(data), f.opts.InterfaceVersion)
	if err != nil {
		return &Error{Comment: fmt.Sprintf("States compat.txt unparsable: %v", err), Err: err}
	}
	if !ok {
		return &Error{Comment: fmt.Sprintf("States not compatible with agent version %s (the states interface this agent offers; compat.txt: %s)", f.opts.InterfaceVersion, strings.Join(strings.Fields(string(data)), " "))}
	}
	return nil
}

// Compatible reports whether version satisfies every constraint line of
// compat.txt ("< 2.0", ">= 1.5.1"; blank lines and # comments ignored).
// Versions compare numerically, part by part.
func Compatible(text, version string) (bool, error) {
	v, err := parseVersion(version)
	if err != nil {
		return false, fmt.Errorf("agent version %q: %w", version, err)
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	n := 0
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		n++
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		var op, rest string
		for _, cand := range []string{"<=", ">=", "==", "!=", "<", ">"} {
			if strings.HasPrefix(line, cand) {
				op, rest = cand, strings.TrimSpace(line[len(cand):])
				break
			}
		}
		if op == "" {
			return false, fmt.Errorf("line %d %q: expected <op> <version> with op one of < <= > >= == !=", n, line)
		}
		want, err := parseVersion(rest)
		if err != nil {
			return false, fmt.Errorf("line %d %q: %w", n, line, err)
		}
		c := compare(v, want)
		hold := map[string]bool{"<": c < 0, "<=": c <= 0, ">": c > 0, ">=": c >= 0, "==": c == 0, "!=": c != 0}[op]
		if !hold {
			return false, nil
		}
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("after line %d: %w", n, err)
	}
	return true, nil
}

func parseVersion(s string) ([]int, error) {
	s = strings.TrimPrefix(strings.TrimSpace(s), "v")
	if s == "" {
		return nil, errors.New("empty version")
	}
	var out []int
	for _, p := range strings.Split(s, ".") {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("%q is not a dotted numeric version", s)
		}
		out = append(out, n)
	}
	return out, nil
}

func compare(a, b []int) int {
	for i := 0; i < max(len(a), len(b)); i++ {
		var x, y int
		if i < len(a) {
			x = a[i]
		}
		if i < len(b) {
			y = b[i]
		}
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}
