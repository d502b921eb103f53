package native

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/visualops/opsagent/agent/state"
	"github.com/visualops/opsagent/internal/dockerapi"
	"github.com/visualops/opsagent/internal/fsutil"
)

// pushRecord is what linux.docker.pushed pushed last, kept beside the
// watched files' checksums (one file per state).
type pushRecord struct {
	Ref       string `json:"ref"`                 // repository:tag
	Image     string `json:"image"`               // the image id pushed
	Container string `json:"container,omitempty"` // the container committed, if any
	Digest    string `json:"digest,omitempty"`    // the manifest digest the registry took
}

func (e *Executor) pushRecordFile(stateID string) string {
	return filepath.Join(e.opts.WatchDir, strings.ReplaceAll(stateID, "/", "-")+"-docker-pushed.json")
}

func (e *Executor) readPushRecord(stateID string) pushRecord {
	var r pushRecord
	if data, err := fsutil.ReadFileLimit(e.pushRecordFile(stateID), 4<<10); err == nil {
		_ = json.Unmarshal(data, &r)
	}
	return r
}

func (e *Executor) writePushRecord(stateID string, r pushRecord) error {
	if err := os.MkdirAll(e.opts.WatchDir, 0o755); err != nil {
		return err
	}
	b, _ := json.Marshal(r)
	return fsutil.WriteFileAtomic(e.pushRecordFile(stateID), b, 0o644)
}

// dockerPushed is linux.docker.pushed: repository:tag is pushed when the
// image (or, with container, the container to commit) is another one
// than the last push of this state; an unchanged image is not pushed
// again. A push recreates the dep_containers.
func (e *Executor) dockerPushed(ctx context.Context, s *stateRun) (state.Result, error) {
	ref, err := parseImageRef(s.p, "repository", "tag")
	if err != nil {
		return state.Result{}, err
	}
	if ref.digest != "" {
		return state.Result{}, &badParam{"repository", "must be a name[:tag], not a digest"}
	}
	auth, err := dockerAuth(s.p, ref.name)
	if err != nil {
		return state.Result{}, err
	}
	container, err := s.p.str("container")
	if err != nil {
		return state.Result{}, err
	}
	container = strings.TrimSpace(container)
	if container != "" && !containerNameRe.MatchString(container) {
		return state.Result{}, &badParam{"container", fmt.Sprintf("%q is not a container name or id", container)}
	}
	message, err := s.p.str("message")
	if err != nil {
		return state.Result{}, err
	}
	author, err := s.p.str("author")
	if err != nil {
		return state.Result{}, err
	}
	deps, err := containerNames(s.p, "dep_containers")
	if err != nil {
		return state.Result{}, err
	}
	c, notes, err := s.dockerEngine(ctx)
	if err != nil {
		return state.Result{}, failf("Image %s: %v", ref, err)
	}
	if c == nil {
		return changed(fmt.Sprintf("Image %s would be pushed: %s", ref, strings.Join(notes, "; "))), nil
	}
	defer c.Close()
	last := e.readPushRecord(s.id)
	rec := pushRecord{Ref: ref.String()}
	comments := notes
	if container != "" {
		ct, err := c.Inspect(ctx, container)
		if dockerapi.IsNotFound(err) {
			return dockerFailure(comments, failf("Image %s: container %s, to commit, does not exist", ref, container))
		}
		if err != nil {
			return dockerFailure(comments, dockerErr(err, "Image %s: cannot inspect container %s", ref, container))
		}
		rec.Container = ct.ID
		if last.Ref == rec.Ref && last.Container == ct.ID {
			return state.Result{OK: true, Changed: len(notes) > 0, Comment: strings.Join(append(comments, fmt.Sprintf("Image %s is already in the correct state (container %s was committed and pushed as %s)", ref, container, shortID(last.Image))), "\n")}, nil
		}
		if s.test {
			return changed(strings.Join(append(comments, fmt.Sprintf("Container %s would be committed as %s and pushed", container, ref)), "\n")), nil
		}
		if rec.Image, err = c.Commit(ctx, ct.ID, ref.name, ref.tag, message, author); err != nil {
			return dockerFailure(comments, dockerErr(err, "Image %s: cannot commit container %s", ref, container))
		}
		comments = append(comments, fmt.Sprintf("Container %s committed as %s (%s)", container, ref, shortID(rec.Image)))
		if last.Image != "" && last.Image != rec.Image {
			if note := removeOldImage(ctx, c, last.Image); note != "" {
				comments = append(comments, note)
			}
		}
	} else {
		img, err := c.ImageInspect(ctx, ref.String())
		if dockerapi.IsNotFound(err) {
			return dockerFailure(comments, failf("Image %s does not exist here: build it (linux.docker.built) or pull it first", ref))
		}
		if err != nil {
			return dockerFailure(comments, dockerErr(err, "Image %s: cannot inspect it", ref))
		}
		rec.Image = img.ID
		if last.Ref == rec.Ref && last.Image == img.ID && last.Container == "" {
			return state.Result{OK: true, Changed: len(notes) > 0, Comment: strings.Join(append(comments, fmt.Sprintf("Image %s is already in the correct state (%s was pushed)", ref, shortID(img.ID))), "\n")}, nil
		}
		if s.test {
			return changed(strings.Join(append(comments, fmt.Sprintf("Image %s would be pushed (%s)", ref, shortID(img.ID))), "\n")), nil
		}
	}
	prog, err := c.Push(ctx, ref.name, ref.tag, auth)
	if err != nil {
		res, err := dockerFailure(comments, dockerErr(err, "Image %s: push failed", ref))
		res.Stdout = prog.Output
		return res, err
	}
	rec.Digest = prog.Digest
	comments = append(comments, fmt.Sprintf("Image %s pushed (%s)", ref, prog.Digest))
	if err := e.writePushRecord(s.id, rec); err != nil {
		return changedFailure(comments, dockerErr(err, "Image %s: pushed, but what was pushed cannot be recorded (the next round pushes again)", ref))
	}
	if len(deps) > 0 {
		rc, err := s.renewContainers(ctx, c, deps, "image "+ref.String()+" pushed")
		comments = append(comments, rc...)
		if err != nil {
			return changedFailure(comments, err)
		}
	}
	return state.Result{OK: true, Changed: true, Comment: strings.Join(comments, "\n"), Stdout: prog.Output}, nil
}
