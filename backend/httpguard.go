package backend

import (
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// hostSet is the set of Host header values the backend answers to. A web
// page can make a browser send requests to the backend (a cross-site POST,
// or DNS rebinding: the page's own name re-pointed at 127.0.0.1), but such
// requests carry the page's host name, not one of ours, and a foreign
// Origin. Checking both keeps browsers out of the API and the agent socket.
type hostSet struct {
	exact   map[string]bool // "host:port", lower case, IPv6 in brackets
	anyPort map[string]bool // names configured without a port
	// ipPort, when not "", allows any IP literal with that port: set when
	// listening on a wildcard address, whose IPs are not known in advance.
	// Rebinding needs a DNS name, so IP literals are safe to allow.
	ipPort string
}

// newHostSet builds the set from Options.AllowedHosts alone (Handler used
// without ListenAndServe).
func newHostSet(extra []string) *hostSet {
	h := &hostSet{exact: map[string]bool{}, anyPort: map[string]bool{}}
	for _, e := range extra {
		host, port := splitHost(e)
		if port == "" {
			h.anyPort[host] = true
		} else {
			h.exact[net.JoinHostPort(host, port)] = true
		}
	}
	return h
}

// withListener adds the listen address as given (its port replaced by the
// bound one when it was 0) and the bound address; for loopback or wildcard
// listeners also localhost, 127.0.0.1 and [::1] on the bound port.
func (h *hostSet) withListener(listen string, bound net.Addr) *hostSet {
	out := &hostSet{exact: map[string]bool{}, anyPort: h.anyPort, ipPort: h.ipPort}
	for k := range h.exact {
		out.exact[k] = true
	}
	tcp, ok := bound.(*net.TCPAddr)
	if !ok {
		return out
	}
	port := strconv.Itoa(tcp.Port)
	out.exact[strings.ToLower(tcp.String())] = true
	host, _ := splitHost(listen)
	if host != "" {
		out.exact[net.JoinHostPort(host, port)] = true
	}
	ip := net.ParseIP(host)
	wildcard := host == "" || ip != nil && ip.IsUnspecified()
	if wildcard {
		out.ipPort = port
	}
	if wildcard || host == "localhost" || ip != nil && ip.IsLoopback() {
		for _, name := range []string{"localhost", "127.0.0.1", "::1"} {
			out.exact[net.JoinHostPort(name, port)] = true
		}
	}
	return out
}

// allows reports whether hostport (a Host header, or an Origin's host) is
// one of ours.
func (h *hostSet) allows(hostport string) bool {
	host, port := splitHost(hostport)
	if host == "" {
		return false
	}
	if h.anyPort[host] {
		return true
	}
	if port == "" {
		// A browser omits the scheme's default port.
		return h.exact[net.JoinHostPort(host, "80")] || h.exact[net.JoinHostPort(host, "443")]
	}
	if h.exact[net.JoinHostPort(host, port)] {
		return true
	}
	return h.ipPort != "" && port == h.ipPort && net.ParseIP(host) != nil
}

// splitHost splits "host[:port]" into a lower-case host without brackets
// and a port ("" when absent).
func splitHost(hostport string) (host, port string) {
	hostport = strings.ToLower(strings.TrimSpace(hostport))
	if h, p, err := net.SplitHostPort(hostport); err == nil {
		return h, p
	}
	return strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]"), ""
}

// guard refuses requests for a Host that is not ours (421) and browser
// requests from another origin (403), before any route runs.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.hosts.Load().allows(r.Host) {
			apiError(w, http.StatusMisdirectedRequest,
				"Host %q is not served here: connect to the listen address, or allow this name with --allow-host %s (Options.AllowedHosts)",
				r.Host, hostOnly(r.Host))
			return
		}
		if !s.originAllowed(r) {
			apiError(w, http.StatusForbidden,
				"Origin %q is not this backend: browsers on other sites may not call it (allow a name with --allow-host)",
				r.Header.Get("Origin"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// originAllowed accepts requests without an Origin (agents, curl) and those
// whose Origin is an http(s) URL of an allowed host. It is also gorilla's
// Upgrader.CheckOrigin.
func (s *Server) originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	u, err := url.Parse(origin)
	if err != nil || u.Scheme != "http" && u.Scheme != "https" || u.Path != "" && u.Path != "/" {
		return false
	}
	return s.hosts.Load().allows(u.Host)
}

func hostOnly(hostport string) string {
	host, _ := splitHost(hostport)
	if host == "" {
		return "<name>"
	}
	return host
}
