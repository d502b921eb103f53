package userdata

import "strings"

// Values are what Parse found in userdata.
type Values struct {
	WSURI, AppID, Version, BaseRemote, PubKey, SHA256, EnrollSecret string
	// Set holds the non-empty lines of OPSAGENT_SET: "section.key=value"
	// items for `opsagent install --set`; nil when there are none.
	Set []string
	// Vars holds every assignment found, known or not.
	Vars map[string]string
}

// Parse reads KEY=value assignments from any userdata text: the script
// Render makes, a hand-written script, the 2014 form `export KEY=value`.
// A later assignment wins; lines that do not start with an assignment
// (cloud-config, commands, comments) are ignored. A value is one bash word:
// single-quoted, double-quoted (\" \\ \$ \` escapes), $'...' (ANSI-C) and
// unquoted segments with backslash escapes, concatenated; an unquoted part
// ends at whitespace or a control operator (; & | < > ( )). Nothing is
// expanded: "$HOME" stays "$HOME". Quoted values may span lines.
// A carriage return counts as whitespace outside quotes, so that userdata
// written on Windows parses. Parse never fails: it returns what it could
// read.
func Parse(data []byte) Values {
	p := parser{src: string(data), vars: map[string]string{}}
	for !p.eof() {
		p.line()
	}
	v := Values{
		WSURI:        p.vars[VarWSURI],
		AppID:        p.vars[VarAppID],
		Version:      p.vars[VarVersion],
		BaseRemote:   p.vars[VarBaseRemote],
		PubKey:       p.vars[VarPubKey],
		SHA256:       p.vars[VarSHA256],
		EnrollSecret: p.vars[VarEnrollSecret],
		Vars:         p.vars,
	}
	for _, item := range strings.Split(p.vars[VarSet], "\n") {
		if item != "" {
			v.Set = append(v.Set, item)
		}
	}
	return v
}

// parser is a cursor over the userdata text.
type parser struct {
	src  string
	pos  int
	vars map[string]string
}

func (p *parser) eof() bool { return p.pos >= len(p.src) }

// peek returns the byte i places ahead, or 0 past the end.
func (p *parser) peek(i int) byte {
	if p.pos+i >= len(p.src) {
		return 0
	}
	return p.src[p.pos+i]
}

// line reads the assignments that begin the commands of one line (several
// when separated by `;`), then skips the rest of the line, unquoted: an
// unbalanced quote in a line that is not an assignment (prose in a
// cloud-config, say) must not swallow the lines after it.
func (p *parser) line() {
	for p.command() && p.peek(0) == ';' && p.peek(1) != ';' {
		p.pos++
	}
	if i := strings.IndexByte(p.src[p.pos:], '\n'); i >= 0 {
		p.pos += i + 1
	} else {
		p.pos = len(p.src)
	}
}

// command reads the assignment words that start a simple command, `export`
// allowed first. It reports whether the command was assignments only, so
// that line can go on after a `;`.
func (p *parser) command() bool {
	p.blanks()
	if p.keyword("export") {
		p.blanks()
	}
	found := false
	for {
		name, ok := p.assignment()
		if !ok {
			return found && p.atOperator()
		}
		found = true
		if p.peek(0) == '(' { // an array, not a string: not ours
			return false
		}
		p.vars[name] = p.word()
		p.blanks()
	}
}

// keyword consumes w when it is a whole word at the cursor.
func (p *parser) keyword(w string) bool {
	if !strings.HasPrefix(p.src[p.pos:], w) {
		return false
	}
	if c := p.peek(len(w)); c != ' ' && c != '\t' {
		return false
	}
	p.pos += len(w)
	return true
}

// assignment consumes NAME= and returns NAME, or consumes nothing.
func (p *parser) assignment() (string, bool) {
	i := p.pos
	for i < len(p.src) && isNameByte(p.src[i], i == p.pos) {
		i++
	}
	if i == p.pos || i >= len(p.src) || p.src[i] != '=' {
		return "", false
	}
	name := p.src[p.pos:i]
	p.pos = i + 1
	return name, true
}

func isNameByte(c byte, first bool) bool {
	switch {
	case c == '_', 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z':
		return true
	default:
		return !first && '0' <= c && c <= '9'
	}
}

// atOperator reports whether the cursor is at the end of a command.
func (p *parser) atOperator() bool {
	switch p.peek(0) {
	case 0, '\n', ';', '#':
		return true
	}
	return false
}

// blanks skips spaces and tabs (and carriage returns, see Parse).
func (p *parser) blanks() {
	for !p.eof() && isBlank(p.src[p.pos]) {
		p.pos++
	}
}

func isBlank(c byte) bool { return c == ' ' || c == '\t' || c == '\r' }

// endsWord reports whether an unquoted c ends a word.
func endsWord(c byte) bool {
	return isBlank(c) || strings.IndexByte("\n;&|<>()", c) >= 0
}

// word reads one bash word at the cursor, removing its quotes.
func (p *parser) word() string {
	var b strings.Builder
	for !p.eof() {
		c := p.src[p.pos]
		switch {
		case endsWord(c):
			return b.String()
		case c == '\'':
			p.pos++
			b.WriteString(p.upTo("'"))
		case c == '"':
			p.pos++
			p.double(&b)
		case c == '$' && p.peek(1) == '\'':
			p.pos += 2
			p.ansiC(&b)
		case c == '$' && p.peek(1) == '"': // $"..." is "..." translated
			p.pos += 2
			p.double(&b)
		case c == '\\':
			p.pos++
			p.escaped(&b)
		default:
			b.WriteByte(c)
			p.pos++
		}
	}
	return b.String()
}

// upTo returns the text before the closing quote and consumes both. Bash
// would reject an unclosed quote; Parse ends it at the end of the line so
// that the lines after it still count.
func (p *parser) upTo(quote string) string {
	rest := p.src[p.pos:]
	end := strings.Index(rest, quote)
	if end < 0 {
		end = strings.IndexByte(rest, '\n')
		if end < 0 {
			end = len(rest)
		}
		p.pos += end
		return rest[:end]
	}
	p.pos += end + len(quote)
	return rest[:end]
}

// escaped reads the byte after an unquoted backslash: taken literally,
// except that backslash-newline joins lines.
func (p *parser) escaped(b *strings.Builder) {
	switch c := p.peek(0); {
	case p.eof():
		b.WriteByte('\\')
	case c == '\n':
		p.pos++
	default:
		b.WriteByte(c)
		p.pos++
	}
}

// double reads a double-quoted segment after its opening quote. Only \ " $
// ` and newline can be escaped; before anything else the backslash stays.
func (p *parser) double(b *strings.Builder) {
	end := p.closing('"')
	for p.pos < end {
		c := p.src[p.pos]
		p.pos++
		if c != '\\' || p.pos == end {
			b.WriteByte(c)
			continue
		}
		switch n := p.src[p.pos]; {
		case n == '\n':
			p.pos++
		case strings.IndexByte("\\\"$`", n) >= 0:
			b.WriteByte(n)
			p.pos++
		default:
			b.WriteByte('\\')
		}
	}
	p.skipQuote('"')
}

// ansiC reads a $'...' segment after its opening, decoding bash's ANSI-C
// escapes; an unknown escape stays as written.
func (p *parser) ansiC(b *strings.Builder) {
	end := p.closing('\'')
	for p.pos < end {
		c := p.src[p.pos]
		p.pos++
		if c != '\\' || p.pos == end {
			b.WriteByte(c)
			continue
		}
		p.pos += ansiEscape(b, p.src[p.pos:end])
	}
	p.skipQuote('\'')
}

// ansiEscape writes the byte that the escape at the start of s (after its
// backslash) stands for, and returns how many bytes of s it used.
func ansiEscape(b *strings.Builder, s string) int {
	if i := strings.IndexByte("abefnrtv\\'\"?E", s[0]); i >= 0 {
		b.WriteByte("\a\b\x1b\f\n\r\t\v\\'\"?\x1b"[i])
		return 1
	}
	if n, used := digits(s, 0, 3, 8); used > 0 {
		b.WriteByte(byte(n))
		return used
	}
	if s[0] == 'x' {
		if n, used := digits(s, 1, 2, 16); used > 0 {
			b.WriteByte(byte(n))
			return 1 + used
		}
	}
	b.WriteByte('\\')
	return 0
}

// digits reads up to max digits in base from s[from:], returning their
// value and how many it read.
func digits(s string, from, max, base int) (value, used int) {
	for used < max && from+used < len(s) {
		d := strings.IndexByte("0123456789abcdef", lower(s[from+used]))
		if d < 0 || d >= base {
			break
		}
		value = value*base + d
		used++
	}
	return value, used
}

func lower(c byte) byte {
	if 'A' <= c && c <= 'F' {
		return c + 'a' - 'A'
	}
	return c
}

// closing returns the index of the quote q that closes the segment at the
// cursor, backslash escapes skipped. Bash would reject an unclosed quote;
// Parse ends the segment at the end of the line so that the lines after it
// still count, and then returns that index.
func (p *parser) closing(q byte) int {
	for i := p.pos; i < len(p.src); i++ {
		switch p.src[i] {
		case '\\':
			i++
		case q:
			return i
		}
	}
	if i := strings.IndexByte(p.src[p.pos:], '\n'); i >= 0 {
		return p.pos + i
	}
	return len(p.src)
}

// skipQuote consumes the closing quote q when the cursor is at one.
func (p *parser) skipQuote(q byte) {
	if p.peek(0) == q { // peek is 0, never a quote, at the end
		p.pos++
	}
}
