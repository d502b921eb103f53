// Command demo runs the whole opsagent story locally (`make demo`): it
// starts the embedded backend and an agent as real processes in a temporary
// root, pushes a recipe, releases a meta.wait through the API, and narrates
// every StateLog, then stops everything. Nothing outside the temporary
// directory is touched.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

const recipe = `{"state":[
 {"id":"about","module":"meta.comment","parameter":{"comment":"a small web root, built natively"}},
 {"id":"webroot","module":"linux.dir","parameter":{"path":["/srv/demo/www"],"mode":"0755"}},
 {"id":"index","module":"linux.file","parameter":{"path":"/srv/demo/www/index.html","content":"<h1>hello from opsagent</h1>\n","mode":"0644"}},
 {"id":"current","module":"linux.symlink","parameter":{"source":"/srv/demo/www","target":"/srv/demo/current"}},
 {"id":"check","module":"linux.cmd","parameter":{"cmd":"wc -c < index.html","cwd":"/srv/demo/www"}},
 {"id":"db-ready","module":"meta.wait","parameter":{"state":["@{db.state.1}"]}}
]}`

func main() {
	bin := flag.String("bin", "bin/opsagent", "the opsagent binary")
	keep := flag.Bool("keep", false, "keep the temporary directory")
	flag.Parse()
	if err := run(*bin, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func say(format string, a ...any) { fmt.Printf(format+"\n", a...) }

func run(bin string, keep bool) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	bin, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "opsagent-demo-")
	if err != nil {
		return err
	}
	if keep {
		say("(keeping %s)", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	root := filepath.Join(dir, "root")

	say("== 1. start the embedded backend")
	addrFile := filepath.Join(dir, "addr")
	backend := exec.Command(bin, "backend", "--listen", "127.0.0.1:0", "--data", filepath.Join(dir, "backend-data"), "--addr-file", addrFile, "--open-enrollment")
	blog, _ := os.Create(filepath.Join(dir, "backend.log"))
	backend.Stdout, backend.Stderr = blog, blog
	if err := backend.Start(); err != nil {
		return err
	}
	defer stopProc(backend)
	addr, err := waitFile(ctx, addrFile)
	if err != nil {
		return err
	}
	api := "http://" + addr
	say("   backend listening on %s (agents connect to ws://%s/agent/)", api, addr)

	say("== 2. push a recipe for app 'demo' (PUT %s/api/apps/demo/recipe)", api)
	var put struct {
		RecipeVersion int `json:"recipe_version"`
	}
	if err := call("PUT", api+"/api/apps/demo/recipe", recipe, &put); err != nil {
		return err
	}
	say("   stored as recipe_version %d: comment, dir, file, symlink, cmd, wait", put.RecipeVersion)

	say("== 3. start an agent in a temporary root %s", root)
	conf := fmt.Sprintf("[userdata]\nws_uri = ws://%s/agent/\napp_id = demo\n[network]\ninstance_id = i-demo\n[salt]\ndelay = 3s\n", addr)
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "etc/opsagent.conf"), []byte(conf), 0o640); err != nil {
		return err
	}
	agent := exec.Command(bin, "--root", root, "run")
	alog, _ := os.Create(filepath.Join(dir, "agent.stderr"))
	agent.Stdout, agent.Stderr = alog, alog
	if err := agent.Start(); err != nil {
		return err
	}
	defer stopProc(agent)
	say("   opsagent --root %s run   (pid %d, [salt] delay = 3s between rounds)", root, agent.Process.Pid)

	var seen int64
	follow := func(until func([]logEntry) bool, limit time.Duration) error {
		deadline := time.Now().Add(limit)
		for time.Now().Before(deadline) {
			var page struct {
				Logs []logEntry `json:"logs"`
			}
			if err := call("GET", fmt.Sprintf("%s/api/apps/demo/logs?after=%d", api, seen), "", &page); err != nil {
				return err
			}
			for _, l := range page.Logs {
				mark := "ok  "
				if !l.Result {
					mark = "FAIL"
				}
				c := ""
				if l.Comment != nil {
					c = *l.Comment
				}
				say("   StateLog %s %-9s %s", mark, l.StateID, c)
				if l.Stdout != nil && strings.TrimSpace(*l.Stdout) != "" {
					say("            output: %s", strings.TrimSpace(*l.Stdout))
				}
				seen = l.Seq
			}
			if until(page.Logs) {
				return nil
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
		return fmt.Errorf("nothing more happened within %v (see %s)", limit, dir)
	}
	say("== 4. handshake, recipe pushed, first round (the wait blocks it)")
	if err := follow(func(l []logEntry) bool { return seen >= 5 }, 20*time.Second); err != nil {
		return err
	}
	say("   … the round now waits on 'db-ready' until the backend releases it")
	time.Sleep(2 * time.Second)
	say("== 5. release the wait (POST %s/api/apps/demo/waits)", api)
	if err := call("POST", api+"/api/apps/demo/waits", `{"instance_id":"i-demo","state_id":"db-ready"}`, nil); err != nil {
		return err
	}
	if err := follow(func([]logEntry) bool { return seen >= 6 }, 10*time.Second); err != nil {
		return err
	}
	say("== 6. next round, 3 s later: everything is already in place")
	if err := follow(func([]logEntry) bool { return seen >= 12 }, 20*time.Second); err != nil {
		return err
	}
	time.Sleep(500 * time.Millisecond) // status.json is refreshed every 250 ms
	say("== 7. opsagent status")
	st := exec.Command(bin, "--root", root, "status")
	out, _ := st.CombinedOutput()
	for _, line := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		say("   %s", line)
	}
	say("== 8. stop the agent (SIGTERM) and the backend")
	begin := time.Now()
	code := stopProc(agent)
	say("   agent exited with code %d in %v", code, time.Since(begin).Round(time.Millisecond))
	if keep {
		say("   files it made: %s; its log: %s", filepath.Join(root, "srv/demo"), filepath.Join(root, "var/log/visualops/agent.log"))
	} else {
		say("   (the temporary root is removed now; run 'go run ./scripts/demo -keep' to look around)")
	}
	return nil
}

type logEntry struct {
	Seq     int64   `json:"seq"`
	StateID string  `json:"state_id"`
	Result  bool    `json:"result"`
	Comment *string `json:"comment"`
	Stdout  *string `json:"stdout"`
}

func call(method, url, body string, out any) error {
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err == nil && body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s %s", method, url, resp.Status, data)
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

func waitFile(ctx context.Context, path string) (string, error) {
	for i := 0; i < 200; i++ {
		if b, err := os.ReadFile(path); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			return strings.TrimSpace(string(b)), nil
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return "", fmt.Errorf("%s never appeared", path)
}

func stopProc(c *exec.Cmd) int {
	if c.ProcessState != nil {
		return c.ProcessState.ExitCode()
	}
	_ = c.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = c.Process.Kill()
		<-done
	}
	return c.ProcessState.ExitCode()
}
