package fileserver

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestFreshIgnoresIfModifiedSince: a file rewritten within the second of
// the client's cached copy is served whole, where http.FileServer answers
// 304 Not Modified.
func TestFreshIgnoresIfModifiedSince(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "Release")
	if err := os.WriteFile(file, []byte("new index\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	stamp := time.Now().Truncate(time.Second)
	if err := os.Chtimes(file, stamp, stamp); err != nil {
		t.Fatal(err)
	}
	get := func(h http.Handler) int {
		req := httptest.NewRequest("GET", "/Release", nil)
		req.Header.Set("If-Modified-Since", stamp.UTC().Format(http.TimeFormat))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec.Code
	}
	if code := get(http.FileServer(http.Dir(dir))); code != http.StatusNotModified {
		t.Fatalf("the plain file server answered %d: the premise (304 within the same second) no longer holds", code)
	}
	if code := get(Fresh(dir)); code != http.StatusOK {
		t.Fatalf("Fresh answered %d, want 200 with the file", code)
	}
}
