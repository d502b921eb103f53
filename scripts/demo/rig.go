package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"golang.org/x/sys/unix"
)

// rig holds what the demo started, so that it can stop all of it.
type rig struct {
	ctx   context.Context
	dir   string
	procs []*exec.Cmd
}

// narration: numbered sections, ✓ for what was shown to work, timings.
type narrator struct {
	section int
	began   time.Time
}

func (n *narrator) title(format string, a ...any) {
	if n.section > 0 {
		fmt.Printf("   (%v)\n", time.Since(n.began).Round(time.Millisecond))
	}
	n.section++
	n.began = time.Now()
	fmt.Printf("\n== %d. %s\n", n.section, fmt.Sprintf(format, a...))
}

func ok(format string, a ...any)   { fmt.Printf("   ✓ %s\n", fmt.Sprintf(format, a...)) }
func info(format string, a ...any) { fmt.Printf("     %s\n", fmt.Sprintf(format, a...)) }

// indent prints a command's output, indented, dropping blank lines.
func indent(out string) {
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		if strings.TrimSpace(line) != "" {
			fmt.Printf("     │ %s\n", line)
		}
	}
}

// start runs a long-lived process with its output in dir/<name>.log.
func (r *rig) start(name string, env []string, bin string, args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(bin, args...)
	logFile, err := os.Create(filepath.Join(r.dir, name+".log"))
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	r.procs = append(r.procs, cmd)
	return cmd, nil
}

// run runs a command to its end and returns its combined output.
func (r *rig) run(env []string, stdin string, bin string, args ...string) (string, error) {
	cmd := exec.CommandContext(r.ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", filepath.Base(bin), strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// stopAll stops every process the demo started (SIGTERM to its group,
// then SIGKILL).
func (r *rig) stopAll() {
	for i := len(r.procs) - 1; i >= 0; i-- {
		c := r.procs[i]
		if c.ProcessState != nil {
			continue
		}
		_ = syscall.Kill(-c.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
			<-done
		}
	}
}

// leftovers lists the processes whose command line mentions the demo's
// directory: the agent and its watchers run from there.
func (r *rig) leftovers() []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(r.dir)) {
			continue
		}
		if stat, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); bytes.Contains(stat, []byte(") Z")) {
			continue
		}
		out = append(out, e.Name()+" "+strings.ReplaceAll(string(bytes.TrimRight(cmdline, "\x00")), "\x00", " "))
	}
	return out
}

// adoptOrphans makes the demo the reaper of what it starts indirectly.
// The agent and its watchdog are started detached (a session of their
// own, through a parent that exits at once), so they are nobody's child;
// once stopped, each would stay a zombie until PID 1 reaps it, which some
// containers' init does late or never, and `pgrep opsagent` would still
// count it after the demo. As a child subreaper, the demo gets them as
// children instead, and reapOrphans collects them at the end.
func adoptOrphans() error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", err)
	}
	return nil
}

// reapOrphans collects the exit status of every adopted process that has
// exited, waiting up to d for those still exiting. Call it only once the
// demo's own commands have all been waited for: wait4(-1) would take the
// status an exec.Cmd still waits for.
func reapOrphans(d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		switch {
		case err == unix.EINTR || pid > 0:
			continue
		case err != nil: // ECHILD: no child left
			return
		case time.Now().After(deadline):
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// freeAddr returns a loopback address nothing listens on.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func (r *rig) waitListening(addr string) error {
	return r.until(20*time.Second, "something listening on "+addr, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

// until polls cond every 50 ms.
func (r *rig) until(limit time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not within %v (logs in %s)", what, limit, r.dir)
		}
		select {
		case <-r.ctx.Done():
			return r.ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

func (r *rig) waitFile(path string) (string, error) {
	var text string
	err := r.until(20*time.Second, path+" written", func() bool {
		b, err := os.ReadFile(path)
		text = strings.TrimSpace(string(b))
		return err == nil && text != ""
	})
	return text, err
}

// s3 is a real S3-protocol server (versitygw, posix backend) standing in
// for the release bucket: the publish goes through SigV4 like on AWS, and
// instances read the objects with anonymous GETs as from a public bucket.
type s3 struct {
	endpoint string
	env      []string // credentials for `opsagent release publish`
}

const (
	s3Access = "demo-access"
	s3Secret = "demo-secret-key"
	bucket   = "releases"
)

func (r *rig) startS3(versitygw string) (*s3, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	data := filepath.Join(r.dir, "s3")
	if err := os.MkdirAll(data, 0o700); err != nil {
		return nil, err
	}
	if _, err := r.start("s3", nil, versitygw, "--access", s3Access, "--secret", s3Secret, "--port", addr, "posix", data); err != nil {
		return nil, err
	}
	if err := r.waitListening(addr); err != nil {
		return nil, err
	}
	client, err := minio.New(addr, &minio.Options{Creds: credentials.NewStaticV4(s3Access, s3Secret, ""), Region: "us-east-1", BucketLookup: minio.BucketLookupPath})
	if err != nil {
		return nil, err
	}
	if err := client.MakeBucket(r.ctx, bucket, minio.MakeBucketOptions{}); err != nil {
		return nil, fmt.Errorf("make bucket: %w", err)
	}
	policy := `{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":["s3:GetObject"],"Resource":["arn:aws:s3:::` + bucket + `/*"]}]}`
	if err := client.SetBucketPolicy(r.ctx, bucket, policy); err != nil {
		return nil, fmt.Errorf("bucket policy: %w", err)
	}
	return &s3{endpoint: "http://" + addr, env: []string{"AWS_ACCESS_KEY_ID=" + s3Access, "AWS_SECRET_ACCESS_KEY=" + s3Secret}}, nil
}

// api calls the backend's HTTP API with its token.
func api(token, method, url, body string, out any) error {
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		return err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s %s", method, url, resp.Status, bytes.TrimSpace(data))
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}
