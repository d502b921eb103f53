package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/visualops/opsagent/agent/statusfile"
	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/testutil/imds"
	"github.com/visualops/opsagent/internal/textcut"
)

// startIMDS serves the instance metadata (IMDSv2) on loopback: the
// instance id, and the userdata set later.
func (s *story) startIMDS(instanceID string) (*imds.Server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	h := imds.NewHandler(instanceID, "", false)
	h.URL = "http://" + ln.Addr().String()
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	go func() { <-s.ctx.Done(); _ = srv.Close() }()
	return h, nil
}

// instanceRow is the backend's view of an instance.
type instanceRow struct {
	InstanceID   string `json:"instance_id"`
	Connected    bool   `json:"connected"`
	AgentVersion string `json:"agent_version"`
	InitErrors   string `json:"init_errors"`
}

func (s *story) waitInstance(what string, cond func(instanceRow) bool) (instanceRow, error) {
	var row instanceRow
	err := s.until(60*time.Second, what, func() bool {
		var page struct {
			Instances []instanceRow `json:"instances"`
		}
		if api(s.token, "GET", s.api+"/api/apps/"+app+"/instances", "", &page) != nil {
			return false
		}
		for _, in := range page.Instances {
			if in.InstanceID == instance {
				row = in
				return cond(in)
			}
		}
		return false
	})
	return row, err
}

type logEntry struct {
	Seq          int64   `json:"seq"`
	AgentVersion string  `json:"agent_version"`
	StateID      string  `json:"state_id"`
	Result       bool    `json:"result"`
	Comment      *string `json:"comment"`
	Stdout       *string `json:"stdout"`
}

func (s *story) logs(after int64) ([]logEntry, error) {
	var page struct {
		Logs []logEntry `json:"logs"`
	}
	err := api(s.token, "GET", fmt.Sprintf("%s/api/apps/%s/logs?after=%d", s.api, app, after), "", &page)
	return page.Logs, err
}

// follow prints the StateLogs the backend receives until it has n.
func (s *story) follow(n int64, limit time.Duration) error {
	return s.until(limit, fmt.Sprintf("StateLog %d", n), func() bool {
		logs, err := s.logs(s.logsSeen)
		if err != nil {
			return false
		}
		for _, l := range logs {
			mark := "✓"
			if !l.Result {
				mark = "✗"
			}
			c := ""
			if l.Comment != nil {
				c = *l.Comment
			}
			fmt.Printf("     StateLog %s %-10s %s\n", mark, textcut.Printable(l.StateID), firstLine(c, 90))
			if l.Stdout != nil && strings.TrimSpace(*l.Stdout) != "" {
				fmt.Printf("                           output: %s\n", firstLine(*l.Stdout, 70))
			}
			s.logsSeen = l.Seq
		}
		return s.logsSeen >= n
	})
}

func firstLine(text string, limit int) string {
	line, _, _ := strings.Cut(strings.TrimSpace(text), "\n")
	if cut := textcut.Prefix(line, limit); cut != line {
		line = cut + "…"
	}
	return textcut.Printable(line)
}

func (s *story) status() statusfile.Snapshot {
	var st statusfile.Snapshot
	data, _ := os.ReadFile(s.layout.StatusFile())
	_ = json.Unmarshal(data, &st)
	return st
}

func (s *story) agentPID() int { return s.status().PID }

// packRelease packs an opsagent.tgz around one binary (for both
// architectures) and signs it as `opsagent release build` does.
func packRelease(version string, binary []byte, keyFile string) (tgz, sig []byte, err error) {
	key, err := dist.LoadSecretKey(keyFile, "")
	if err != nil {
		return nil, nil, err
	}
	entries := []archive.Entry{{Name: "VERSION", Mode: 0o644, Data: []byte(version + "\n")}}
	for _, arch := range dist.Arches() {
		entries = append(entries, archive.Entry{Name: dist.BinaryName(arch), Mode: 0o755, Data: binary})
	}
	var buf bytes.Buffer
	if err := archive.Create(context.Background(), &buf, entries, time.Now()); err != nil {
		return nil, nil, err
	}
	return buf.Bytes(), dist.Sign(key, buf.Bytes(), "version:"+version), nil
}
