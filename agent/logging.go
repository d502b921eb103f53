package agent

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"gopkg.in/natefinch/lumberjack.v2"
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
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return logSink{}, fmt.Errorf("log file %s: %w ([global] logfile)", path, err)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o640)
	if err != nil {
		return logSink{}, fmt.Errorf("log file %s: %w ([global] logfile)", path, err)
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
