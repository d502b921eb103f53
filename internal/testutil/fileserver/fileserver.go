// Package fileserver serves a directory of package-index files to the
// package managers under test (apt, dnf, gem) as a plain static mirror
// does, except that every request gets the files as they are now.
package fileserver

import "net/http"

// Fresh is http.FileServer on dir with the conditional request headers
// dropped. A package manager asks If-Modified-Since with the date of the
// copy it cached, and HTTP dates count whole seconds: an index a test
// rebuilt within the second of the last fetch would be answered 304, and
// the tool would keep the old index (a version published, then at once
// looked for, would not be seen). Real mirrors change far less often than
// once a second; tests do it at once.
func Fresh(dir string) http.Handler {
	files := http.FileServer(http.Dir(dir))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for _, h := range []string{"If-Modified-Since", "If-None-Match", "If-Range", "If-Unmodified-Since", "If-Match"} {
			r.Header.Del(h)
		}
		files.ServeHTTP(w, r)
	})
}
