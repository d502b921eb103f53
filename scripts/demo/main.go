// Command demo runs the whole opsagent story locally (`make demo`), with
// real processes on loopback and nothing outside a temporary directory:
//
//  1. publish: `opsagent release keygen/build/publish` puts signed
//     releases 1.0.0 and 2.0.0 (and a deliberately broken 3.0.0) into an
//     S3 bucket (versitygw, a real S3-protocol server);
//  2. the embedded backend starts and gets the app's recipe;
//  3. userdata: an instance boots: `curl …/latest/user-data | bash` from a
//     loopback IMDSv2 installs the agent from the bucket and starts it;
//  4. rounds: the agent handshakes, applies the recipe, waits for a wait
//     to be released, and converges round after round;
//  5. self-update: 2.0.0 is pushed mid-round, the round finishes, the
//     binary is swapped and the same process handshakes as 2.0.0;
//  6. rollback: the broken 3.0.0 is rolled back and the backend hears why;
//  7. re-run by hand: the userdata again says "already installed,
//     nothing to do";
//  8. everything stops; nothing is left running.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/visualops/opsagent/internal/config"
	"github.com/visualops/opsagent/internal/dist"
	"github.com/visualops/opsagent/internal/fsutil"
)

func main() {
	bin := flag.String("bin", "bin/opsagent", "the opsagent binary (its backend, its release commands)")
	versitygw := flag.String("versitygw", "", "versitygw binary, the local S3 server (make demo builds it)")
	source := flag.String("source", ".", "the opsagent checkout releases are built from")
	keep := flag.Bool("keep", false, "keep the temporary directory (logs, the instance's root)")
	flag.Parse()
	if err := demo(*bin, *versitygw, *source, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "\n   ✗ demo:", err)
		os.Exit(1)
	}
}

const recipe = `{"state":[
 {"id":"about","module":"meta.comment","parameter":{"comment":"a small web root, built natively"}},
 {"id":"webroot","module":"linux.dir","parameter":{"path":["/srv/demo/www"],"mode":"0755"}},
 {"id":"index","module":"linux.file","parameter":{"path":"/srv/demo/www/index.html","content":"<h1>hello from opsagent</h1>\n","mode":"0644"}},
 {"id":"current","module":"linux.symlink","parameter":{"source":"/srv/demo/www","target":"/srv/demo/current"}},
 {"id":"check","module":"linux.cmd","parameter":{"cmd":"wc -c < index.html","cwd":"/srv/demo/www"}},
 {"id":"db-ready","module":"meta.wait","parameter":{"state":["@{db.state.1}"]}},
 {"id":"warm-cache","module":"linux.cmd","parameter":{"cmd":"sleep 1","cwd":"/srv/demo"}}
]}`

const (
	app      = "demo"
	instance = "i-0demo00000000001"
	states   = 7
)

func demo(bin, versitygw, source string, keep bool) (err error) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if bin, err = filepath.Abs(bin); err != nil {
		return err
	}
	if err := adoptOrphans(); err != nil {
		return err
	}
	if versitygw == "" {
		return errors.New("-versitygw is required (make demo builds it into .tools/bin)")
	}
	dir, err := os.MkdirTemp("", "opsagent-demo-")
	if err != nil {
		return err
	}
	r := &rig{ctx: ctx, dir: dir}
	root, err := fsutil.NewRoot(filepath.Join(dir, "root"))
	if err != nil {
		return err
	}
	s := &story{rig: r, bin: bin, root: root.Dir(), layout: config.NewLayout(root, "", nil), n: &narrator{}}
	begin := time.Now()
	defer func() {
		s.finish(keep, err == nil)
		if err == nil {
			fmt.Printf("\n== done: publish, userdata, rounds, self-update, rollback and re-run in %v\n", time.Since(begin).Round(100*time.Millisecond))
		}
	}()
	for _, step := range []func() error{
		func() error { return s.publish(versitygw, source) },
		s.backend,
		s.bootstrap,
		s.rounds,
		s.update,
		s.rollback,
		s.rerun,
	} {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// story is the demo's state from one section to the next.
type story struct {
	*rig
	n        *narrator
	bin      string
	root     string // the instance's root (OPSAGENT_ROOT)
	layout   config.Layout
	s3       *s3
	pubkey   string
	base     string // base_remote: where instances download releases
	api      string // the backend's HTTP address
	token    string // its API token, read from <data>/api-token
	addr     string
	imds     string
	logsSeen int64
}

func (s *story) publish(versitygw, source string) error {
	s.n.title("publish: build, sign and upload releases (opsagent release …)")
	var err error
	if s.s3, err = s.startS3(versitygw); err != nil {
		return err
	}
	ok("a local S3 server (versitygw) at %s, bucket %q, objects public-read", s.s3.endpoint, bucket)
	keys := filepath.Join(s.dir, "keys")
	out, err := s.run(nil, "", s.bin, "release", "keygen", "--out", keys, "--unencrypted")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "RW") {
			s.pubkey = strings.TrimSpace(line)
		}
	}
	if s.pubkey == "" {
		return fmt.Errorf("release keygen printed no public key:\n%s", out)
	}
	ok("opsagent release keygen: signing key %s (public key %s…)", filepath.Join(keys, "minisign.key"), s.pubkey[:16])
	for _, v := range []string{"1.0.0", "2.0.0"} {
		dist := filepath.Join(s.dir, "dist-"+v)
		t := time.Now()
		// --allow-dirty: the demo builds the working tree as it is.
		if _, err := s.run(nil, "", s.bin, "release", "build", "--version", v, "--key", filepath.Join(keys, "minisign.key"),
			"--out", dist, "--source", source, "--allow-dirty"); err != nil {
			return err
		}
		ok("opsagent release build --version %s: linux/amd64 + linux/arm64, signed (%v)", v, time.Since(t).Round(100*time.Millisecond))
		if err := s.publishDist(dist, v); err != nil {
			return err
		}
	}
	// 3.0.0 is broken on purpose: it passes the updater's smoke test
	// (`opsagent version --json`) but exits as soon as it runs as the
	// agent. Signed with the same key, it is a release the updater must
	// install, watch fail, and roll back.
	dist3 := filepath.Join(s.dir, "dist-3.0.0")
	if err := packBroken(dist3, "3.0.0", filepath.Join(keys, "minisign.key")); err != nil {
		return err
	}
	if err := s.publishDist(dist3, "3.0.0"); err != nil {
		return err
	}
	info("3.0.0 is a deliberately broken build (starts, then exits at once)")
	s.base = s.s3.endpoint + "/" + bucket + "/opsagent"
	return nil
}

func (s *story) publishDist(dist, version string) error {
	_, err := s.run(s.s3.env, "", s.bin, "release", "publish", "--bucket", bucket, "--prefix", "opsagent/", "--endpoint", s.s3.endpoint,
		"--dist", dist, "--version", version)
	if err != nil {
		return err
	}
	ok("opsagent release publish --version %s → s3://%s/opsagent/%s/opsagent.tgz (+ .sha256, .minisig, latest.json)", version, bucket, version)
	return nil
}

func (s *story) backend() error {
	s.n.title("the backend: opsagent backend, and the app's recipe")
	addrFile := filepath.Join(s.dir, "backend.addr")
	data := filepath.Join(s.dir, "backend-data")
	// OPSAGENT_API_TOKEN emptied: the backend makes its own token.
	if _, err := s.start("backend", []string{"OPSAGENT_API_TOKEN="}, s.bin, "backend", "--listen", "127.0.0.1:0", "--data", data, "--addr-file", addrFile); err != nil {
		return err
	}
	var err error
	if s.addr, err = s.waitFile(addrFile); err != nil {
		return err
	}
	s.api = "http://" + s.addr
	ok("backend at %s; agents connect to ws://%s/agent/", s.api, s.addr)
	// As an operator would: export OPSAGENT_API_TOKEN=$(cat <data>/api-token).
	tokenFile := filepath.Join(data, "api-token")
	tok, err := fsutil.ReadFileLimit(tokenFile, 4<<10)
	if err != nil {
		return fmt.Errorf("the backend's API token: %w", err)
	}
	s.token = strings.TrimSpace(string(tok))
	ok("API token: %s, made on first start; every API call sends it as 'Authorization: Bearer …'", tokenFile)
	var put struct {
		RecipeVersion int `json:"recipe_version"`
	}
	if err := api(s.token, "PUT", s.api+"/api/apps/"+app+"/recipe", recipe, &put); err != nil {
		return err
	}
	ok("PUT /api/apps/%s/recipe → recipe_version %d: comment, dir, file, symlink, cmd, wait, cmd", app, put.RecipeVersion)
	return nil
}

func (s *story) bootstrap() error {
	s.n.title("userdata: an instance boots and installs the agent from the bucket")
	var enroll struct {
		Secret string `json:"enrollment_secret"`
	}
	if err := api(s.token, "GET", s.api+"/api/apps/"+app+"/enrollment", "", &enroll); err != nil {
		return err
	}
	ok("GET /api/apps/%s/enrollment: the secret a new instance presents once", app)
	meta, err := s.startIMDS(instance)
	if err != nil {
		return err
	}
	s.imds = meta.URL
	// [network] metadata points at the loopback IMDS: nothing here may
	// reach 169.254.169.254.
	ud, err := s.run(nil, "", s.bin, "userdata", "--ws-uri", "ws://"+s.addr+"/agent/", "--app-id", app, "--version", "1.0.0",
		"--base-remote", s.base, "--pubkey", s.pubkey, "--enroll-secret", enroll.Secret,
		"--set", "network.metadata="+s.imds, "--set", "agent.engine=native", "--set", "salt.delay=3s")
	if err != nil {
		return err
	}
	meta.SetUserdata(ud)
	ok("opsagent userdata → a %d-byte bootstrap script, served as the instance's user-data by a loopback IMDSv2 at %s", len(ud), s.imds)
	return s.curlUserdata()
}

// curlUserdata runs the userdata the way an operator does by hand on a
// custom AMI, IMDSv2 token first.
func (s *story) curlUserdata() error {
	script := `TOKEN=$(curl -sS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$IMDS/latest/api/token")
curl -sSL -H "X-aws-ec2-metadata-token: $TOKEN" "$IMDS/latest/user-data" | bash`
	info("$ curl -sSL -H \"X-aws-ec2-metadata-token: $TOKEN\" $IMDS/latest/user-data | bash   (OPSAGENT_ROOT=%s)", s.root)
	t := time.Now()
	out, err := s.run([]string{"IMDS=" + s.imds, "OPSAGENT_ROOT=" + s.root, "OPSAGENT_FOREGROUND=1"}, "", "bash", "-c", script)
	indent(out)
	if err != nil {
		return err
	}
	ok("bootstrap finished in %v", time.Since(t).Round(time.Millisecond))
	return nil
}

func (s *story) rounds() error {
	s.n.title("rounds: Handshake, the recipe, a wait, and convergence")
	in, err := s.waitInstance("the agent's Handshake", func(in instanceRow) bool { return in.Connected })
	if err != nil {
		return err
	}
	ok("Handshake from %s: agent %s, instance id read from the metadata service", in.InstanceID, in.AgentVersion)
	if err := s.follow(5, 30*time.Second); err != nil {
		return err
	}
	info("… the round now waits on 'db-ready' until the backend releases it")
	if err := api(s.token, "POST", s.api+"/api/apps/"+app+"/waits", `{"instance_id":"`+instance+`","state_id":"db-ready"}`, nil); err != nil {
		return err
	}
	ok("POST /api/apps/%s/waits {\"state_id\":\"db-ready\"}: released", app)
	if err := s.follow(states, 15*time.Second); err != nil {
		return err
	}
	info("… next round, 3 s later ([salt] delay): everything is already in place")
	if err := s.follow(2*states, 20*time.Second); err != nil {
		return err
	}
	page, err := os.ReadFile(filepath.Join(s.root, "srv/demo/www/index.html"))
	if err != nil {
		return err
	}
	link, _ := os.Readlink(filepath.Join(s.root, "srv/demo/current"))
	ok("in the instance's root: srv/demo/www/index.html = %s; srv/demo/current -> %s", strings.TrimSpace(string(page)), link)
	return nil
}

func (s *story) update() error {
	s.n.title("self-update: 2.0.0 pushed in the middle of a round")
	pid := s.agentPID()
	// Into the next round, up to its last state (a 1 s command).
	if err := s.follow(s.logsSeen+states-1, 30*time.Second); err != nil {
		return err
	}
	if err := s.until(30*time.Second, "the agent inside warm-cache", func() bool {
		e := s.status().Engine
		return e.StateID == "warm-cache" && e.Phase == "running"
	}); err != nil {
		return err
	}
	seen := s.logsSeen
	t := time.Now()
	if err := api(s.token, "POST", s.api+"/api/apps/"+app+"/update", `{"version":"2.0.0"}`, nil); err != nil {
		return err
	}
	ok("POST /api/apps/%s/update {\"version\":\"2.0.0\"} while state warm-cache runs", app)
	in, err := s.waitInstance("a Handshake as 2.0.0", func(in instanceRow) bool { return in.Connected && in.AgentVersion == "2.0.0" })
	if err != nil {
		return err
	}
	ok("Handshake as %s %v after the AgentUpdate: downloaded, signature verified, swapped, re-executed", in.AgentVersion, time.Since(t).Round(time.Millisecond))
	logs, err := s.logs(seen)
	if err != nil {
		return err
	}
	if len(logs) == 0 || logs[0].StateID != "warm-cache" {
		return fmt.Errorf("the round in progress did not finish first: %v", logs)
	}
	ok("the round in progress finished first (warm-cache reported by 1.0.0)")
	if p := s.agentPID(); p == pid {
		ok("same process (pid %d), new binary; 1.0.0 kept as opsagent.old for a rollback", p)
	} else {
		info("the agent's pid changed %d → %d", pid, p)
	}
	return s.follow(s.logsSeen+states, 30*time.Second)
}

func (s *story) rollback() error {
	s.n.title("rollback: the broken 3.0.0")
	if err := api(s.token, "POST", s.api+"/api/apps/"+app+"/update", `{"version":"3.0.0"}`, nil); err != nil {
		return err
	}
	ok("POST /api/apps/%s/update {\"version\":\"3.0.0\"}", app)
	t := time.Now()
	in, err := s.waitInstance("the rollback reported", func(in instanceRow) bool {
		return in.Connected && in.AgentVersion == "2.0.0" && strings.Contains(in.InitErrors, "rolled back")
	})
	if err != nil {
		return err
	}
	ok("3.0.0 did not come up; rolled back to %s in %v", in.AgentVersion, time.Since(t).Round(time.Millisecond))
	ok("the backend hears why, in the Handshake's init_errors:")
	indent(in.InitErrors)
	return s.follow(s.logsSeen+states, 30*time.Second)
}

func (s *story) rerun() error {
	s.n.title("re-run by hand: the same userdata on the installed instance")
	if err := s.curlUserdata(); err != nil {
		return err
	}
	in, err := s.waitInstance("the agent still connected", func(in instanceRow) bool { return in.Connected })
	if err != nil {
		return err
	}
	ok("still agent %s (the userdata's 1.0.0 does not downgrade a self-update)", in.AgentVersion)
	st, _ := s.run(nil, "", s.layout.Binary(), "--root", s.root, "status")
	info("$ opsagent status")
	indent(st)
	return nil
}

// finish stops everything and says what is left.
func (s *story) finish(keep, succeeded bool) {
	s.n.title("stop: uninstall the agent, stop the backend and S3")
	if _, err := os.Stat(s.layout.Binary()); err == nil {
		if _, err := s.run(nil, "", s.layout.Binary(), "--root", s.root, "uninstall"); err != nil {
			fmt.Printf("   ✗ uninstall: %v\n", err)
		} else {
			ok("opsagent uninstall: agent stopped, service and binary removed (config, token, logs kept)")
		}
	}
	s.stopAll()
	fmt.Printf("   (%v)\n", time.Since(s.n.began).Round(time.Millisecond))
	if left := s.leftovers(); len(left) > 0 {
		fmt.Printf("   ✗ still running: %v (killing them)\n", left)
		for _, l := range left {
			var pid int
			fmt.Sscan(l, &pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	} else {
		ok("nothing left running")
	}
	reapOrphans(5 * time.Second)
	if keep || !succeeded {
		info("logs and the instance's root are in %s", s.dir)
		return
	}
	os.RemoveAll(s.dir)
	info("(temporary directory removed; `go run ./scripts/demo -keep …` keeps it)")
}

// packBroken writes a signed release whose binary is a shell script.
func packBroken(dir, version, keyFile string) error {
	script := []byte(fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = version ]; then echo '{\"version\":\"%s\"}'; exit 0; fi\necho 'broken release: exiting' >&2\nexit 3\n", version))
	tgz, sig, err := packRelease(version, script, keyFile)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(tgz)
	files := map[string][]byte{
		dist.TarballName:   tgz,
		dist.ChecksumName:  []byte(hex.EncodeToString(sum[:]) + "  " + dist.TarballName + "\n"),
		dist.SignatureName: sig,
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}
