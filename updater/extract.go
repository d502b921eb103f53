package updater

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"github.com/visualops/opsagent/internal/archive"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
)

// extractRelease takes the VERSION file and this architecture's binary out
// of the verified tarball, in one pass that stops once it has both (the
// release tarball puts VERSION first, then the binaries: the rest is never
// decompressed), writing the binary straight to dst, where it waits for
// the swap. The VERSION must be the one asked for. On error nothing is
// left at dst.
func extractRelease(ctx context.Context, tarball, dst, v string) error {
	in, err := fsutil.OpenFixedFile(tarball)
	if err != nil {
		return fmt.Errorf("update to %s: %w", v, err)
	}
	defer in.Close()
	out, err := fsutil.CreateFixedFile(dst, 0o755)
	if err != nil {
		return fmt.Errorf("update to %s: %w", v, err)
	}
	name := dist.BinaryName(runtime.GOARCH)
	var ver bytes.Buffer
	err = archive.ExtractFiles(ctx, in, map[string]io.Writer{"VERSION": &ver, name: out}, archive.DefaultLimits())
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	switch {
	case err != nil:
		err = refuse("update to %s refused: the tarball has no usable VERSION and %s: %v", v, name, err)
	case strings.TrimSpace(ver.String()) != v:
		err = refuse("update to %s refused: the tarball says VERSION %s", v, strings.TrimSpace(ver.String()))
	}
	if err != nil {
		_ = os.Remove(dst)
		return err
	}
	return nil
}
