package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync/atomic"

	"gopkg.in/natefinch/lumberjack.v2"

	"github.com/visualops/opsagent/internal/fsutil"
)

// logSink is the agent's logger and what must be closed with it.
type logSink struct {
	logger *slog.Logger
	file   *lumberjack.Logger
}

func (l logSink) Close() {
	if l.file != nil {
		_ = l.file.Close()
	}
}

// openLog logs to path, rotated by size (10 MiB, 5 compressed backups), and
// also to extra when it is not nil (the agent's stderr when it is a
// terminal).
func openLog(path string, level slog.Level, extra io.Writer) (logSink, error) {
	if err := fsutil.EnsureDir(filepath.Dir(path), 0o750); err != nil {
		return logSink{}, fmt.Errorf("log file %s: %w ([global] logfile)", path, err)
	}
	// Created here, never through a link planted at its name (the agent
	// would append to whatever it points to) nor into a FIFO (the open
	// would block until a reader came, and the agent, wedged, would
	// ignore SIGTERM): the rotating writer then opens the file checked.
	f, err := fsutil.AppendFixedFile(path, 0o640)
	if err != nil {
		return logSink{}, fmt.Errorf("log file: %w ([global] logfile)", err)
	}
	_ = f.Close()
	lj := &lumberjack.Logger{Filename: path, MaxSize: 10, MaxBackups: 5, Compress: true}
	var w io.Writer = lj
	if extra != nil {
		w = io.MultiWriter(lj, extra)
	}
	h := slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})
	return logSink{logger: slog.New(h), file: lj}, nil
}

// switchHandler is a slog.Handler that writes to whatever handler was set
// last: what lives as long as the process (the outbox) logs through it, and
// a reload that opens a new log file (or a new level) sets the new one.
type switchHandler struct {
	cur *atomic.Pointer[slog.Handler]
	// with is what WithAttrs and WithGroup asked for, applied to the
	// current handler at each record.
	with []func(slog.Handler) slog.Handler
}

func newSwitchHandler(h slog.Handler) switchHandler {
	s := switchHandler{cur: &atomic.Pointer[slog.Handler]{}}
	s.set(h)
	return s
}

func (s switchHandler) set(h slog.Handler) { s.cur.Store(&h) }

func (s switchHandler) handler() slog.Handler {
	h := *s.cur.Load()
	for _, w := range s.with {
		h = w(h)
	}
	return h
}

func (s switchHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return (*s.cur.Load()).Enabled(ctx, l)
}

func (s switchHandler) Handle(ctx context.Context, r slog.Record) error {
	return s.handler().Handle(ctx, r)
}

func (s switchHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return s.derive(func(h slog.Handler) slog.Handler { return h.WithAttrs(as) })
}

func (s switchHandler) WithGroup(name string) slog.Handler {
	return s.derive(func(h slog.Handler) slog.Handler { return h.WithGroup(name) })
}

func (s switchHandler) derive(w func(slog.Handler) slog.Handler) switchHandler {
	return switchHandler{cur: s.cur, with: append(append([]func(slog.Handler) slog.Handler(nil), s.with...), w)}
}
