// Package imds is a loopback instance metadata service for tests and the
// demo: EC2's IMDSv2 (token PUT first) or IMDSv1 only, serving an instance
// id and a userdata the caller sets. Nothing talks to 169.254.169.254.
package imds

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Server is a fake metadata service.
type Server struct {
	URL string
	// V1Only refuses the token PUT (an instance with IMDSv1 only); by
	// default only IMDSv2 is served (requests without a token get 401).
	V1Only bool

	mu         sync.Mutex
	userdata   string
	instanceID string
	role       string       // the instance role's name, "" for none
	roleCreds  []byte       // its credentials, as EC2 serves them
	Reads      atomic.Int64 // userdata requests answered
	RoleReads  atomic.Int64 // role credential requests answered
}

// SetRole gives the instance an IAM role whose temporary credentials are
// accessKey, secretKey and sessionToken, served where EC2 serves them.
func (s *Server) SetRole(name, accessKey, secretKey, sessionToken string) {
	data, _ := json.Marshal(map[string]string{
		"Code": "Success", "Type": "AWS-HMAC", "LastUpdated": time.Now().UTC().Format(time.RFC3339),
		"AccessKeyId": accessKey, "SecretAccessKey": secretKey, "Token": sessionToken,
		"Expiration": time.Now().Add(6 * time.Hour).UTC().Format(time.RFC3339),
	})
	s.mu.Lock()
	s.role, s.roleCreds = name, data
	s.mu.Unlock()
}

const token = "test-imds-token"

// New starts a server for the life of the test.
func New(t testing.TB, instanceID, userdata string, v1only bool) *Server {
	s := NewHandler(instanceID, userdata, v1only)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	s.URL = srv.URL
	return s
}

// NewHandler returns the service as a handler, for a caller that serves
// it itself (and then sets URL).
func NewHandler(instanceID, userdata string, v1only bool) *Server {
	return &Server{instanceID: instanceID, userdata: userdata, V1Only: v1only}
}

// SetUserdata changes what /latest/user-data returns.
func (s *Server) SetUserdata(u string) {
	s.mu.Lock()
	s.userdata = u
	s.mu.Unlock()
}

// ServeHTTP answers the token PUT, the instance id and the userdata.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/latest/api/token" {
		if s.V1Only || r.Method != http.MethodPut {
			http.Error(w, "forbidden", http.StatusForbidden)
			return
		}
		_, _ = w.Write([]byte(token))
		return
	}
	if !s.V1Only && r.Header.Get("X-aws-ec2-metadata-token") != token {
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch r.URL.Path {
	case "/latest/meta-data/instance-id":
		_, _ = w.Write([]byte(s.instanceID))
	case "/latest/meta-data/iam/security-credentials/":
		if s.role == "" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(s.role))
	case "/latest/meta-data/iam/security-credentials/" + s.role:
		if s.role == "" {
			http.NotFound(w, r)
			return
		}
		s.RoleReads.Add(1)
		_, _ = w.Write(s.roleCreds)
	case "/latest/user-data":
		s.Reads.Add(1)
		if s.userdata == "" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(s.userdata))
	default:
		http.NotFound(w, r)
	}
}
