package main

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
