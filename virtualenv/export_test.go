package virtualenv

// What the external tests (package virtualenv_test, which can import
// virtualenv/venvtest without an import cycle) need to see.
var (
	FindPython2For = findPython2
	Python2Missing = python2Missing
)

const MinimalMarker = minimalMarker
