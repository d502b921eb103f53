package release

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/visualops/opsagent/internal/dist"
)

// PublishOptions configures Publish.
type PublishOptions struct {
	Bucket   string
	Version  string
	Endpoint string // URL of an S3-compatible endpoint; default https://s3.amazonaws.com
	Region   string // default us-east-1
	Prefix   string // key prefix, e.g. "opsagent/"
	Dist     string // directory with the built artifacts; default "dist"
	Force    bool   // overwrite an existing version
	ACL      string // canned ACL; default public-read; "none" sends none
	// Creds overrides the standard AWS environment / shared credentials.
	Creds *credentials.Credentials
	// Progress, when set, receives a progress reader per uploaded file.
	Progress func(name string, size int64) io.Reader
	// beforeLatest is a test hook run just before latest.json is written.
	beforeLatest func() error
}

// Publish uploads the artifacts of dist to <prefix><version>/, verifies
// each upload by reading it back, and only then writes <prefix>latest.json.
func Publish(ctx context.Context, o PublishOptions) (*dist.Latest, error) {
	if err := dist.CheckVersion(o.Version); err != nil {
		return nil, err
	}
	if o.Bucket == "" {
		return nil, errors.New("release publish: --bucket is required")
	}
	o = o.withDefaults()
	client, err := newClient(o)
	if err != nil {
		return nil, err
	}
	tarball, err := os.ReadFile(filepath.Join(o.Dist, dist.TarballName))
	if err != nil {
		return nil, fmt.Errorf("release publish: %w (run 'opsagent release build' first)", err)
	}
	if _, err := os.Stat(filepath.Join(o.Dist, dist.SignatureName)); err != nil {
		return nil, fmt.Errorf("release publish: %s is not signed (%w): build with --key so instances can verify it", dist.TarballName, err)
	}
	dir := o.Prefix + o.Version + "/"
	if err := refuseOverwrite(ctx, client, o, dir); err != nil {
		return nil, err
	}
	if err := uploadVersion(ctx, client, o, dir); err != nil {
		return nil, err
	}
	if o.beforeLatest != nil {
		if err := o.beforeLatest(); err != nil {
			return nil, err
		}
	}
	return writeLatest(ctx, client, o, tarball)
}

func (o PublishOptions) withDefaults() PublishOptions {
	if o.Dist == "" {
		o.Dist = "dist"
	}
	if o.Region == "" {
		o.Region = "us-east-1"
	}
	if o.ACL == "" {
		o.ACL = "public-read"
	}
	return o
}

// refuseOverwrite keeps published versions immutable unless forced: an
// instance that verified a tarball must be able to fetch it again.
func refuseOverwrite(ctx context.Context, client *minio.Client, o PublishOptions, dir string) error {
	if o.Force {
		return nil
	}
	_, err := client.StatObject(ctx, o.Bucket, dir+dist.TarballName, minio.StatObjectOptions{})
	if err == nil {
		return fmt.Errorf("release publish: s3://%s/%s%s already exists; versions are immutable (pass --force to overwrite)", o.Bucket, dir, dist.TarballName)
	}
	if resp := minio.ToErrorResponse(err); resp.Code != "NoSuchKey" && resp.Code != "NotFound" && resp.StatusCode != 404 {
		return describe(o, err)
	}
	return nil
}

// uploadVersion uploads the tarball, its checksum and its signature.
func uploadVersion(ctx context.Context, client *minio.Client, o PublishOptions, dir string) error {
	files := []struct{ name, contentType string }{
		{dist.TarballName, "application/gzip"},
		{dist.ChecksumName, "text/plain; charset=utf-8"},
		{dist.SignatureName, "text/plain; charset=utf-8"},
	}
	for _, f := range files {
		data, err := os.ReadFile(filepath.Join(o.Dist, f.name))
		if err != nil {
			return fmt.Errorf("release publish: %w", err)
		}
		if err := putVerified(ctx, client, o, dir+f.name, f.contentType, data); err != nil {
			return err
		}
	}
	return nil
}

// writeLatest points <prefix>latest.json at this version; it runs last, so
// instances never see a latest.json naming files not yet uploaded.
func writeLatest(ctx context.Context, client *minio.Client, o PublishOptions, tarball []byte) (*dist.Latest, error) {
	sum := sha256.Sum256(tarball)
	latest := &dist.Latest{Version: o.Version, SHA256: hex.EncodeToString(sum[:]), PublishedAt: time.Now().UTC().Truncate(time.Second)}
	body, err := dist.EncodeLatest(*latest)
	if err != nil {
		return nil, fmt.Errorf("release publish: %w", err)
	}
	if err := putVerified(ctx, client, o, o.Prefix+dist.LatestName, "application/json", body); err != nil {
		return nil, err
	}
	return latest, nil
}

func newClient(o PublishOptions) (*minio.Client, error) {
	endpoint := o.Endpoint
	if endpoint == "" {
		endpoint = "https://s3.amazonaws.com"
	}
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("release publish: --endpoint %q: expected a URL such as https://s3.amazonaws.com", endpoint)
	}
	creds := o.Creds
	if creds == nil {
		creds = credentials.NewChainCredentials([]credentials.Provider{
			&credentials.EnvAWS{},
			&credentials.FileAWSCredentials{},
		})
	}
	c, err := minio.New(u.Host, &minio.Options{Creds: creds, Secure: u.Scheme == "https", Region: o.Region, BucketLookup: minio.BucketLookupPath})
	if err != nil {
		return nil, fmt.Errorf("release publish: %w", err)
	}
	return c, nil
}

// putVerified uploads data and reads it back, comparing size and SHA-256.
func putVerified(ctx context.Context, c *minio.Client, o PublishOptions, key, contentType string, data []byte) error {
	opts := minio.PutObjectOptions{ContentType: contentType}
	if o.ACL != "none" {
		opts.UserMetadata = map[string]string{"x-amz-acl": o.ACL}
	}
	if o.Progress != nil {
		opts.Progress = o.Progress(key, int64(len(data)))
	}
	if _, err := c.PutObject(ctx, o.Bucket, key, bytes.NewReader(data), int64(len(data)), opts); err != nil {
		return fmt.Errorf("release publish: upload s3://%s/%s: %w", o.Bucket, key, describe(o, err))
	}
	obj, err := c.GetObject(ctx, o.Bucket, key, minio.GetObjectOptions{})
	if err != nil {
		return fmt.Errorf("release publish: read back s3://%s/%s: %w", o.Bucket, key, describe(o, err))
	}
	defer obj.Close()
	h := sha256.New()
	n, err := io.Copy(h, obj)
	if err != nil {
		return fmt.Errorf("release publish: read back s3://%s/%s: %w", o.Bucket, key, describe(o, err))
	}
	want := sha256.Sum256(data)
	if n != int64(len(data)) || !bytes.Equal(h.Sum(nil), want[:]) {
		return fmt.Errorf("release publish: s3://%s/%s reads back as %d bytes with another SHA-256 than the %d bytes uploaded", o.Bucket, key, n, len(data))
	}
	return nil
}

// describe turns S3 errors into messages that say what to fix.
func describe(o PublishOptions, err error) error {
	resp := minio.ToErrorResponse(err)
	switch resp.Code {
	case "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied":
		return fmt.Errorf("%s: %s (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials, and the bucket policy): %w", resp.Code, strings.TrimSpace(resp.Message), err)
	case "NoSuchBucket":
		return fmt.Errorf("bucket %q does not exist (create it, or fix --bucket): %w", o.Bucket, err)
	}
	return err
}
