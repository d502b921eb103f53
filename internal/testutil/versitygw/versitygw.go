// Package versitygw runs a real S3-protocol server (versitygw, posix
// backend, SigV4) on loopback for tests, when the Makefile built it and
// named it in OPSAGENT_VERSITYGW.
package versitygw

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"testing"

	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/visualops/opsagent/internal/testutil/wait"
)

// The account the server accepts.
const (
	AccessKey = "testkey"
	SecretKey = "testsecret123"
)

// Start runs versitygw for the life of the test and returns its endpoint
// URL, credentials it accepts, and the directory it serves buckets from.
// It skips the test when OPSAGENT_VERSITYGW is not set.
func Start(t testing.TB) (endpoint string, creds *credentials.Credentials, dir string) {
	t.Helper()
	bin := os.Getenv("OPSAGENT_VERSITYGW")
	if bin == "" {
		t.Skip("OPSAGENT_VERSITYGW not set (make test builds versitygw and sets it)")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	dir = t.TempDir()
	cmd := exec.Command(bin, "--access", AccessKey, "--secret", SecretKey, "--port", addr, "posix", dir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("versitygw output:\n%s", out.String())
		}
	})
	wait.Eventually(t, "versitygw listening on "+addr, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return "http://" + addr, credentials.NewStaticV4(AccessKey, SecretKey, ""), dir
}
