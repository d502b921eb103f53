package system

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
)

// PasswordHash is the password field of name's line in the root's
// /etc/shadow ("" and false when the user has no line there). It reads
// the file and runs nothing, so a round that changes no password leaves
// no trace.
func (h *Host) PasswordHash(name string) (string, bool, error) {
	data, err := h.readFile("/etc/shadow", maxAccountsFile)
	if errors.Is(err, fs.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	hash, ok := ParseShadow(data)[name]
	return hash, ok, nil
}

// ParseShadow reads shadow(5) lines into user name → password field;
// malformed lines and NIS "+" entries are skipped.
func ParseShadow(data []byte) map[string]string {
	out := map[string]string{}
	eachLine(data, func(line string) {
		f := strings.Split(line, ":")
		if len(f) < 2 || f[0] == "" || f[0][0] == '+' || f[0][0] == '-' {
			return
		}
		if _, dup := out[f[0]]; !dup { // the first line wins, as for getspnam(3)
			out[f[0]] = f[1]
		}
	})
	return out
}

// SetPasswordHash sets name's password field to hash with the root's
// chpasswd -e. The hash goes through chpasswd's standard input, never
// its arguments, which any user can read in ps.
func (h *Host) SetPasswordHash(ctx context.Context, name, hash string) error {
	if strings.ContainsAny(name, ":\n") || strings.ContainsAny(hash, ":\n") {
		return fmt.Errorf("cannot set the password of %q: a user name or hash with ':' or a line break would corrupt /etc/shadow", name)
	}
	_, err := h.Check(ctx, Cmd{Tool: "chpasswd", Args: []string{"-e"}, Stdin: strings.NewReader(name + ":" + hash + "\n")})
	return err
}
