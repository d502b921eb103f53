package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/service"
)

// evilStatusServer answers every request with a status line that carries
// terminal escapes (a window title, a screen clear, a C1 CSI).
func evilStatusServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil || line == "\r\n" {
						break
					}
				}
				_, _ = c.Write([]byte("HTTP/1.1 404 \x1b]0;owned\x07\x1b[2J\u009b31m gone\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
			}()
		}
	}()
	return "http://" + ln.Addr().String()
}

// What a release server says reaches the terminal with its escapes made
// visible (update prints the error through the one sanitiser).
func TestUpdatePrintsNoTerminalEscapes(t *testing.T) {
	root, _ := statusRoot(t)
	conf := filepath.Join(root, "etc/opsagent.conf")
	f, err := os.OpenFile(conf, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteString("[userdata]\npubkey = RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3\n")
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	url := evilStatusServer(t) + "/2.0.0/opsagent.tgz"
	code, out, errs := runCLI(t, "--root", root, "update", "--version", "99.0.0", "--url", url, "--wait", "0")
	if code == exitOK {
		t.Fatalf("update succeeded against a 404:\n%s%s", out, errs)
	}
	for _, s := range []string{out, errs} {
		if strings.ContainsAny(s, "\x1b\x07\u009b") {
			t.Errorf("a terminal escape reached the output: %q", s)
		}
	}
	if !strings.Contains(errs, `\x1b]0;owned\x07\x1b[2J\u009b31m gone`) {
		t.Errorf("the status line is not shown with its escapes made visible: %q", errs)
	}
	if _, err := os.Stat(filepath.Join(root, "opt/visualops/bin/opsagent")); err == nil {
		t.Error("a binary was installed")
	}
}

// fakeAgentScript answers `version --json` as opsagent version v does and
// exits at once when run as the agent.
func fakeAgentScript(v string) []byte {
	return fmt.Appendf(nil, "#!/bin/sh\ncase \"$*\" in *version*) echo '{\"version\":\"%s\"}'; exit 0 ;; esac\nexit 0\n", v)
}

// stopProcessesMentioning kills what still runs with dir in its command
// line (the detached watchdog pass the update started).
func stopProcessesMentioning(dir string) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline"); err == nil && strings.Contains(string(cmdline), dir) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// With no agent running, `opsagent update` below a root other than the
// host's starts the new agent without the host's systemctl, even where
// that root has systemd's run directory and the unit (service.Systemctl's
// rule): the systemd that would answer is this host's. That holds with
// the watchdog an older release left, which the update first rewrites as
// this binary renders it.
func TestUpdateWithoutAnAgentNeverDrivesTheHostSystemd(t *testing.T) {
	for _, tc := range []struct {
		name     string
		watchdog func(l config.Layout) []byte
	}{
		{"this release's watchdog", service.RenderWatchdog},
		{"an older release's watchdog", func(config.Layout) []byte {
			return []byte("#!/bin/sh\nsystemctl start --no-block opsagent.service\n")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { updateBelowASystemdRoot(t, tc.watchdog) })
	}
}

func updateBelowASystemdRoot(t *testing.T, watchdog func(config.Layout) []byte) {
	root := t.TempDir()
	t.Cleanup(func() { stopProcessesMentioning(root) })
	rootFS, _ := fsutil.NewRoot(root)
	conf := "[userdata]\nws_uri = ws://127.0.0.1:1/agent/\napp_id = app-1\n[network]\ninstance_id = i-1\nmetadata = http://127.0.0.1:1\n"
	l := config.NewLayout(rootFS, "", nil)
	for _, d := range []string{filepath.Dir(l.ConfigFile()), l.StateDir(), l.LogDir(), l.BinDir(), l.SystemdRunDir(), filepath.Dir(l.UnitFile())} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for p, data := range map[string][]byte{
		l.ConfigFile(): []byte(conf), l.Binary(): fakeAgentScript("1.0.0"),
		l.CronScript(): watchdog(l), l.UnitFile(): service.RenderUnit(l),
	} {
		if err := os.WriteFile(p, data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin := t.TempDir()
	calls := filepath.Join(t.TempDir(), "systemctl-calls")
	if err := os.WriteFile(filepath.Join(bin, "systemctl"), fmt.Appendf(nil, "#!/bin/sh\necho \"$*\" >>%s\n", calls), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	var tgz bytes.Buffer
	if err := archive.Create(context.Background(), &tgz, []archive.Entry{
		{Name: "VERSION", Mode: 0o644, Data: []byte("2.0.0\n")},
		{Name: dist.BinaryName(runtime.GOARCH), Mode: 0o755, Data: fakeAgentScript("2.0.0")},
	}, time.Unix(0, 0)); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "opsagent.tgz", time.Unix(0, 0), bytes.NewReader(tgz.Bytes()))
	}))
	defer srv.Close()
	code, out, errs := runCLI(t, "--root", root, "update", "--version", "2.0.0", "--url", srv.URL+"/2.0.0/opsagent.tgz", "--insecure-skip-signature")
	if code != exitOK {
		t.Fatalf("update: exit %d\n%s%s", code, out, errs)
	}
	if got, _ := os.ReadFile(calls); len(got) != 0 {
		t.Errorf("the update below %s ran the host's systemctl: %q", root, got)
	}
	if data, _ := os.ReadFile(l.Binary()); !bytes.Equal(data, fakeAgentScript("2.0.0")) {
		t.Error("the binary was not updated")
	}
	if data, _ := os.ReadFile(l.CronScript()); !bytes.Equal(data, service.RenderWatchdog(l)) {
		t.Error("the watchdog was not rewritten as this binary renders it")
	}
}
