package installer

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
	"github.com/visualops/opsagent/internal/userdata"
)

// UserdataOptions configures Userdata.
type UserdataOptions struct {
	Params Params
	Sets   []string
	// SHA256 of the release tarball; "" reads it from Dist, else from
	// <base_remote>/<version>/opsagent.tgz.sha256.
	SHA256     string
	Dist       string
	HTTPClient *http.Client
}

var hexSHA256 = regexp.MustCompile(`^[0-9a-f]{64}$`)

// Userdata renders the bootstrap script for an app. It first builds the
// config that `opsagent install` would write from the same values, and
// checks it as install does (checkConfig): a script whose install would
// refuse a value (a line break, a malformed key, a bad --set) is never
// rendered.
func Userdata(ctx context.Context, o UserdataOptions) ([]byte, error) {
	p := o.Params
	sets, err := ParseSets(o.Sets)
	if err != nil {
		return nil, err
	}
	c := config.New(config.DefaultPath)
	if err := applier(p, sets, "")(c); err != nil {
		return nil, err
	}
	if err := checkConfig(c); err != nil {
		return nil, err
	}
	sum := strings.ToLower(strings.TrimSpace(o.SHA256))
	switch {
	case sum != "":
	case o.Dist != "":
		sum, err = checksumFromFile(filepath.Join(o.Dist, dist.ChecksumName))
	default:
		sum, err = checksumFromRemote(ctx, o.HTTPClient, p.BaseRemote, p.Version)
	}
	if err != nil {
		return nil, err
	}
	if !hexSHA256.MatchString(sum) {
		return nil, fmt.Errorf("--sha256 %q: expected 64 hexadecimal digits (the content of opsagent.tgz.sha256)", sum)
	}
	return userdata.Render(userdata.Params{WSURI: p.WSURI, AppID: p.AppID, Version: p.Version, BaseRemote: p.BaseRemote,
		PubKey: p.PubKey, EnrollSecret: p.EnrollSecret, SHA256: sum, Set: o.Sets})
}

// parseChecksum reads a sha256sum line ("<hex>  opsagent.tgz").
func parseChecksum(name string, data []byte) (string, error) {
	f := strings.Fields(string(data))
	if len(f) == 0 || !hexSHA256.MatchString(strings.ToLower(f[0])) {
		return "", fmt.Errorf("%s: not a sha256sum line", name)
	}
	return strings.ToLower(f[0]), nil
}

func checksumFromFile(path string) (string, error) {
	data, err := fsutil.ReadFileLimit(path, 4<<10)
	if err != nil {
		return "", fmt.Errorf("--dist: %w (run 'opsagent release build' first, or pass --sha256)", err)
	}
	return parseChecksum(path, data)
}

func checksumFromRemote(ctx context.Context, c *http.Client, base, version string) (string, error) {
	if c == nil {
		c = &http.Client{Timeout: 30 * time.Second}
	}
	url := strings.TrimRight(base, "/") + "/" + version + "/" + dist.ChecksumName
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", fmt.Errorf("--base-remote %q: %w", base, err)
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", fmt.Errorf("fetch %s: %w (pass --sha256 or --dist when the release is not published yet)", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("fetch %s: HTTP %s (is version %s published? pass --sha256 or --dist otherwise)", url, resp.Status, version)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if err != nil {
		return "", fmt.Errorf("fetch %s: %w", url, err)
	}
	return parseChecksum(url, data)
}
