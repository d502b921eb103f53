// Package sshd runs OpenSSH's sshd inside a test root (a debroot with
// openssh-server installed) on loopback, with a host key and a client key
// the test makes: nothing of the host's ssh configuration is read or
// changed, and the daemon dies with the test (debroot kills what runs in
// its roots).
package sshd

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/visualops/opsagent/internal/testutil/debroot"
)

// Server is an sshd accepting the client key for every user.
type Server struct {
	Port int
	// ClientKey is the private key sshd accepts, a path inside the root.
	ClientKey string
}

// Files of the test's sshd inside the root (none of them the system's).
const (
	config         = "/etc/ssh/opsagent_test_sshd_config"
	hostKey        = "/etc/ssh/opsagent_test_host_key"
	authorizedKeys = "/etc/ssh/opsagent_test_authorized_keys"
)

// Start runs sshd in root and makes a client key at clientKey (a path
// inside the root, its directory created) that sshd accepts.
func Start(t testing.TB, root, clientKey string) *Server {
	t.Helper()
	if _, err := os.Stat(filepath.Join(root, "usr/sbin/sshd")); err != nil {
		t.Fatalf("sshd: openssh-server is not installed in %s", root)
	}
	run(t, root, "mkdir", "-p", "/run/sshd", filepath.Dir(clientKey))
	run(t, root, "rm", "-f", hostKey, hostKey+".pub", clientKey, clientKey+".pub")
	run(t, root, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostKey)
	run(t, root, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "opsagent-test", "-f", clientKey)
	pub, err := os.ReadFile(filepath.Join(root, clientKey+".pub"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, authorizedKeys), pub, 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	conf := fmt.Sprintf(`Port %d
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
PermitRootLogin prohibit-password
`, port, hostKey, authorizedKeys)
	if err := os.WriteFile(filepath.Join(root, config), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	debroot.StartDaemon(t, root, nil, "127.0.0.1:"+strconv.Itoa(port), "/usr/sbin/sshd", "-D", "-e", "-f", config)
	return &Server{Port: port, ClientKey: clientKey}
}

func run(t testing.TB, root, tool string, args ...string) {
	t.Helper()
	cmd := exec.Command("chroot", append([]string{root, tool}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "HOME=/root"}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sshd: %s %s: %v: %s", tool, strings.Join(args, " "), err, out)
	}
}
