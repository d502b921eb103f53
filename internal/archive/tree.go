package archive

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
)

const (
	// maxLinkHops bounds how many symlinks one resolution may follow, as
	// the kernel's MAXSYMLINKS does; it also ends link cycles.
	maxLinkHops = 40
	// maxLinkSteps bounds the path components all link resolutions of one
	// archive may walk, so that a tangle of long targets cannot make the
	// check itself the attack. Sound archives use a tiny fraction of it.
	maxLinkSteps = 1 << 20
)

type nodeKind int

const (
	dirNode nodeKind = iota + 1
	fileNode
	linkNode
)

// node is one path the extraction has made: a file, a directory (made by
// an entry or by MkdirAll for an entry's parents) or a symlink.
type node struct {
	kind     nodeKind
	parent   *node
	children map[string]*node
	name     string // the entry name, for messages about links
	target   string // a link's target
}

func (n *node) child(c string) *node { return n.children[c] }

func (n *node) add(c string, kind nodeKind) *node {
	if n.children == nil {
		n.children = map[string]*node{}
	}
	child := &node{kind: kind, parent: n}
	n.children[c] = child
	return child
}

// tree models what the extraction has made so far. Extraction starts from
// an empty directory and refuses entries that go through links, so the
// model is exactly what is on disk, and link targets can be resolved in
// memory, the way the kernel would resolve them, before any link exists.
type tree struct {
	root *node
	// unsettled holds links whose resolution passed through a path that
	// does not exist yet: a later link there could change where they lead,
	// so they are resolved again whenever a link is added. A link whose
	// resolution met only existing nodes cannot change, as nothing is ever
	// replaced.
	unsettled map[*node]bool
	steps     int
}

func newTree() *tree {
	return &tree{root: &node{kind: dirNode}, unsettled: map[*node]bool{}}
}

// add checks the entry at the cleaned path name against what the archive
// has made so far and records it. target is the link target of a symlink.
func (t *tree) add(name string, kind nodeKind, target string) error {
	comps := strings.Split(name, "/")
	dirs, base := comps[:len(comps)-1], comps[len(comps)-1]
	if err := t.checkParents(dirs); err != nil {
		return err
	}
	dir := t.root
	for _, c := range dirs {
		next := dir.child(c)
		if next == nil {
			next = dir.add(c, dirNode) // made by MkdirAll
		}
		dir = next
	}
	if old := dir.child(base); old != nil && (old.kind != dirNode || kind != dirNode) {
		return fmt.Errorf("a second entry for %q (only directories may repeat)", name)
	}
	if kind != linkNode {
		if dir.child(base) == nil {
			dir.add(base, kind)
		}
		return nil
	}
	return t.addLink(dir, base, name, target)
}

// checkParents refuses a path whose directories include a link or a file:
// writing through an archive's own link is how extractors get tricked into
// writing elsewhere, and no sound release archive needs it.
func (t *tree) checkParents(dirs []string) error {
	n := t.root
	for i, c := range dirs {
		if n = n.child(c); n == nil {
			return nil
		}
		switch n.kind {
		case linkNode:
			return fmt.Errorf("its path goes through the symlink %q made by an earlier entry", strings.Join(dirs[:i+1], "/"))
		case fileNode:
			return fmt.Errorf("its path goes through the file %q made by an earlier entry", strings.Join(dirs[:i+1], "/"))
		}
	}
	return nil
}

// addLink records the link dir/base -> target if it, and every earlier
// link whose meaning it could change, resolves inside the destination.
func (t *tree) addLink(dir *node, base, name, target string) error {
	switch {
	case target == "":
		return errors.New("symlink with an empty target")
	case strings.ContainsRune(target, 0):
		return errors.New("NUL in the symlink target")
	case strings.HasPrefix(target, "/"):
		return fmt.Errorf("symlink to the absolute path %q leaves the destination", target)
	}
	link := dir.add(base, linkNode)
	link.name, link.target = name, target
	settled, err := t.resolve(link)
	if err != nil {
		delete(dir.children, base)
		return fmt.Errorf("symlink to %q %w", target, err)
	}
	// Sorted, so that the same archive always gets the same error.
	earlier := slices.SortedFunc(maps.Keys(t.unsettled), func(a, b *node) int { return cmp.Compare(a.name, b.name) })
	for _, old := range earlier {
		oldSettled, err := t.resolve(old)
		if err != nil {
			delete(dir.children, base)
			return fmt.Errorf("symlink to %q changes where the earlier symlink %q -> %q leads: it now %w", target, old.name, old.target, err)
		}
		if oldSettled {
			delete(t.unsettled, old)
		}
	}
	if !settled {
		t.unsettled[link] = true
	}
	return nil
}

var errLeaves = errors.New("leaves the destination")

// resolve follows link to the end, component by component as the kernel
// does: ".." after a link climbs from where the link leads, not from where
// it stands. It fails when the path climbs above the destination, follows
// too many links or uses up the step budget, and reports settled when every
// component it met already exists.
func (t *tree) resolve(link *node) (settled bool, err error) {
	cur, todo := link.parent, strings.Split(link.target, "/")
	// missing counts the components walked past the last existing node:
	// below a missing path nothing exists, so there is nothing to look up
	// until ".." climbs back.
	missing, hops := 0, 1
	settled = true
	for len(todo) > 0 {
		if t.steps++; t.steps > maxLinkSteps {
			return false, fmt.Errorf("is one of too many or too tangled symlinks to check (over %d path steps in all)", maxLinkSteps)
		}
		c := todo[0]
		todo = todo[1:]
		switch {
		case c == "" || c == ".":
		case c == ".." && missing > 0:
			missing--
		case c == "..":
			if cur.parent == nil {
				return false, errLeaves
			}
			cur = cur.parent
		case missing > 0:
			missing++
		case cur.child(c) == nil:
			settled, missing = false, 1
		case cur.child(c).kind != linkNode:
			cur = cur.child(c)
		default:
			if hops++; hops > maxLinkHops {
				return false, fmt.Errorf("goes through more than %d symlinks (a cycle)", maxLinkHops)
			}
			next := cur.child(c).target
			if strings.HasPrefix(next, "/") {
				return false, errLeaves
			}
			todo = append(strings.Split(next, "/"), todo...)
		}
	}
	return settled, nil
}
