package system

import (
	"context"
	"fmt"
	"strings"
)

// Services are driven by the init system that manages them (Init): with
// systemd as PID 1, systemctl; otherwise the distribution's service(8)
// wrapper, or the init script itself where there is no wrapper. Below a
// root other than "/" it is always the init scripts, run chrooted: there
// is no systemd there to ask, and systemctl would drive the host's.

// ServiceAction is a change asked of a service.
type ServiceAction string

// The actions of the service module.
const (
	ServiceStart   ServiceAction = "start"
	ServiceReload  ServiceAction = "reload"
	ServiceRestart ServiceAction = "restart"
)

// CheckServiceName refuses names that are not one service: empty, with a
// '/' (a path), white space or control characters, or a leading '-'
// (an option to systemctl or service).
func CheckServiceName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("a service name cannot be empty")
	case name[0] == '-':
		return fmt.Errorf("service name %q cannot start with '-'", name)
	case name == "." || name == "..":
		return fmt.Errorf("service name %q is not allowed", name)
	}
	for _, r := range name {
		if r <= ' ' || r == 0x7f || r == '/' {
			return fmt.Errorf("service name %q cannot contain %q", name, r)
		}
	}
	return nil
}

// ServiceAvailable says why a service cannot be managed here (nil: it
// can). With init scripts, the script must exist; systemd is asked
// nothing here (systemctl start names a unit it does not know).
func (h *Host) ServiceAvailable(name string) error {
	if err := CheckServiceName(name); err != nil {
		return err
	}
	if h.Init() == InitSystemd {
		return nil
	}
	if !h.HasTool(initScript(name)) {
		return fmt.Errorf("the service %s is not available: there is no init script %s", name, initScript(name))
	}
	return nil
}

func initScript(name string) string { return "/etc/init.d/" + name }

// ServiceRunning reports whether the service runs: systemctl is-active,
// or the init script's status (LSB: 0 is running, anything else is not).
func (h *Host) ServiceRunning(ctx context.Context, name string) (bool, error) {
	if err := CheckServiceName(name); err != nil {
		return false, err
	}
	res, err := h.Run(ctx, h.serviceCmd(name, "status"))
	if err != nil {
		return false, err
	}
	return res.ExitCode == 0, nil
}

// ServiceDo starts, reloads or restarts the service; a non-zero exit is
// a *ToolError carrying the tool's output.
func (h *Host) ServiceDo(ctx context.Context, name string, action ServiceAction) error {
	if err := CheckServiceName(name); err != nil {
		return err
	}
	switch action {
	case ServiceStart, ServiceReload, ServiceRestart:
	default:
		return fmt.Errorf("unknown service action %q", action)
	}
	_, err := h.Check(ctx, h.serviceCmd(name, string(action)))
	return err
}

// serviceCmd is the command that does verb ("status" or an action) to
// the service with this system's init.
func (h *Host) serviceCmd(name, verb string) Cmd {
	if h.Init() == InitSystemd {
		if verb == "status" {
			return Cmd{Tool: "systemctl", Args: []string{"is-active", "--quiet", name}}
		}
		return Cmd{Tool: "systemctl", Args: []string{verb, name}}
	}
	if h.HasTool("service") {
		return Cmd{Tool: "service", Args: []string{name, verb}}
	}
	return Cmd{Tool: initScript(name), Args: []string{verb}}
}

// ShellCommand runs a shell command line on the system below the root
// (chrooted there unless the root is "/"): the root's /bin/sh -c.
func (h *Host) ShellCommand(ctx context.Context, command string) (string, error) {
	if strings.TrimSpace(command) == "" {
		return "", fmt.Errorf("an empty command")
	}
	res, err := h.Check(ctx, Cmd{Tool: "/bin/sh", Args: []string{"-c", command}})
	return res.Output, err
}
