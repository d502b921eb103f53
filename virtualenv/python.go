package virtualenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/visualops/opsagent/internal/proc"
)

// The first Salt release PythonFor runs on Python 3; older ones (the 2014
// fork bundles 2014.1.0) are Python 2 only.
const py3SaltYear, py3SaltMonth = 2018, 3

// These patterns find the release in salt/version.py: 2014.1 says
// `__saltstack_version__ = SaltStackVersion(2014, 1, 0)` and derives
// __version_info__ from it; other trees spell __version_info__ out.
const (
	saltStackVersionPattern = `(?m)^__saltstack_version__\s*=\s*SaltStackVersion\(\s*(\d+)\s*,\s*(\d+)(?:\s*,\s*(\d+))?`
	versionInfoPattern      = `(?m)^__version_info__\s*=\s*\(\s*(\d+)\s*,\s*(\d+)(?:\s*,\s*(\d+))?`
)

// SaltVersion reads the version of the Salt a states repository bundles
// (sources/salt/version.py), e.g. [2014 1 0].
func SaltVersion(repoDir string) ([3]int, error) {
	p := filepath.Join(repoDir, "sources", "salt", "version.py")
	data, err := os.ReadFile(p)
	if err != nil {
		return [3]int{}, fmt.Errorf("states repository %s: cannot read Salt's version: %w", repoDir, err)
	}
	for _, pat := range []string{saltStackVersionPattern, versionInfoPattern} {
		if m := regexp.MustCompile(pat).FindSubmatch(data); m != nil {
			var v [3]int
			for i := range 3 {
				v[i], _ = strconv.Atoi(string(m[i+1]))
			}
			return v, nil
		}
	}
	return [3]int{}, fmt.Errorf("states repository %s: no __saltstack_version__ or __version_info__ in %s", repoDir, p)
}

// PythonFor chooses the interpreter for a states repository: override
// ([salt] python) when set; Python 2.7 when the repository's Salt is older
// than 2018.3 (an error when none is installed); python3 otherwise,
// including when the Salt version cannot be read (a repository that is not
// the 2014 fork). why says which and why, for the log.
func PythonFor(ctx context.Context, r proc.Runner, repoDir, override string) (python, why string, err error) {
	if override != "" {
		return override, "set by [salt] python", nil
	}
	v, verr := SaltVersion(repoDir)
	if verr != nil {
		return "python3", fmt.Sprintf("python3: %v", verr), nil
	}
	salt := fmt.Sprintf("%d.%d.%d", v[0], v[1], v[2])
	if v[0] > py3SaltYear || (v[0] == py3SaltYear && v[1] >= py3SaltMonth) {
		return "python3", fmt.Sprintf("python3: the states repository bundles Salt %s", salt), nil
	}
	py, err := FindPython2(ctx, r)
	if err != nil {
		return "", "", python2Missing(salt, err)
	}
	return py, fmt.Sprintf("%s: the states repository bundles Salt %s, which is Python 2 only", py, salt), nil
}

func python2Missing(salt string, err error) error {
	return fmt.Errorf("the states repository needs Python 2.7 (Salt %s), which is not installed on this instance: install python2.7, or set [agent] engine = native (%v)", salt, err)
}

// FindPython2 returns a working Python 2.7 interpreter: on PATH, in the
// usual directories, then pyenv's versions; or an error saying where it
// looked.
func FindPython2(ctx context.Context, r proc.Runner) (string, error) {
	if r == nil {
		r = proc.New()
	}
	py, tried := findPython2(ctx, r, python2Candidates())
	if py == "" {
		return "", fmt.Errorf("no Python 2.7 in %s", strings.Join(tried, ", "))
	}
	return py, nil
}

// python2Candidates lists where Python 2.7 may be, best first: PATH, the
// usual directories, then pyenv's versions ($PYENV_ROOT or ~/.pyenv),
// newest 2.7 first.
func python2Candidates() []string {
	var out []string
	for _, name := range []string{"python2.7", "python2"} {
		if p, err := exec.LookPath(name); err == nil {
			out = append(out, p)
		}
	}
	for _, dir := range []string{"/usr/bin", "/usr/local/bin"} {
		out = append(out, filepath.Join(dir, "python2.7"), filepath.Join(dir, "python2"))
	}
	root := os.Getenv("PYENV_ROOT")
	if root == "" {
		if home, err := os.UserHomeDir(); err == nil {
			root = filepath.Join(home, ".pyenv")
		}
	}
	if root != "" {
		versions, _ := filepath.Glob(filepath.Join(root, "versions", "2.7*"))
		sort.Sort(sort.Reverse(sort.StringSlice(versions)))
		for _, v := range versions {
			out = append(out, filepath.Join(v, "bin", "python2.7"))
		}
	}
	return out
}

// findPython2 returns the first candidate that runs and is 2.7 (a pyenv
// shim on PATH exists but fails when 2.7 is not pyenv's global version),
// and the candidates it looked at.
func findPython2(ctx context.Context, r proc.Runner, candidates []string) (string, []string) {
	seen := map[string]bool{}
	var tried []string
	for _, c := range candidates {
		if seen[c] {
			continue
		}
		seen[c] = true
		tried = append(tried, c)
		if _, err := os.Stat(c); err != nil {
			continue
		}
		if in, err := inspect(ctx, r, c); err == nil && majorMinor(in.version) == "2.7" {
			return c, tried
		}
	}
	return "", tried
}
