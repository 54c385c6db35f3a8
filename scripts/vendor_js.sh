#!/usr/bin/env bash
# Re-create _vendor/: the JavaScript the built book needs, self-hosted so the book works offline.
#
# Why: Jupyter Book 1.x loads require.js (cdnjs), the widget manager (jsdelivr) and MathJax (jsdelivr) from
# CDNs by default. Offline, or when a CDN is down, widgets stay blank and math stays raw. _config.yml points
# `nb_ipywidgets_js` and `mathjax_path` at these files instead (served through `html_static_path`). The folder
# is deliberately NOT `_static/`: JB1 injects every .js/.css of a book-root `_static/` into every page.
#
# Usage: scripts/vendor_js.sh          (needs npm; only the npm registry is contacted, via `npm pack`)
# The result is committed; rerun only to change a version. SHA256SUMS records what was vendored.
set -euo pipefail

HTML_MANAGER_VERSION=1.0.15   # @jupyter-widgets/html-manager 1.0.x renders the ipywidgets 8 protocol (BSD-3-Clause)
REQUIREJS_VERSION=2.3.7       # require.js 2.3.x (MIT)
MATHJAX_VERSION=3.2.2         # MathJax 3 (Apache-2.0)

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/_vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
# `npm pack` downloads the published tarball and checks it against the registry's integrity hash.
npm pack --silent "@jupyter-widgets/html-manager@$HTML_MANAGER_VERSION" "requirejs@$REQUIREJS_VERSION" \
  "mathjax@$MATHJAX_VERSION" >/dev/null
for t in *.tgz; do
  mkdir "${t%.tgz}" && tar -xzf "$t" -C "${t%.tgz}"
done
hm="jupyter-widgets-html-manager-$HTML_MANAGER_VERSION/package"
rq="requirejs-$REQUIREJS_VERSION/package"
mj="mathjax-$MATHJAX_VERSION/package"

rm -rf "$dest"
mkdir -p "$dest/licenses" "$dest/mathjax/output/chtml/fonts"
cp "$hm/dist/embed-amd.js" "$dest/embed-amd.js"
cp "$rq/require.js" "$dest/require.js"
# MathJax resolves its fonts relative to the script: [mathjax]/output/chtml/fonts/woff-v2.
cp "$mj/es5/tex-mml-chtml.js" "$dest/mathjax/tex-mml-chtml.js"
cp -r "$mj/es5/output/chtml/fonts/woff-v2" "$dest/mathjax/output/chtml/fonts/woff-v2"
# The html-manager tarball ships no LICENSE file, only its package.json "license": "BSD-3-Clause" and the
# notices of what its bundle contains; keep both: the BSD-3-Clause text of the Jupyter project, and the notices.
grep -q '"license": "BSD-3-Clause"' "$hm/package.json"
cat > "$dest/licenses/html-manager-LICENSE" <<'LICENSE'
BSD 3-Clause License (declared in @jupyter-widgets/html-manager's package.json)

Copyright (c) Jupyter Development Team.
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
LICENSE
cp "$hm/dist/embed.js.LICENSE.txt" "$dest/licenses/html-manager-bundled-notices.txt"
# requirejs ships no LICENSE file either; its header says "Released under MIT license". Keep the header and
# the MIT text.
grep -q "Released under MIT license" "$rq/require.js"
{
  sed -n '2,3p' "$rq/require.js" | sed 's/^ \* //'
  cat <<'LICENSE'

MIT License

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
LICENSE
} > "$dest/licenses/requirejs-LICENSE"
cp "$mj/LICENSE" "$dest/licenses/mathjax-LICENSE"

cat > "$dest/README.md" <<README
# Vendored JavaScript for the book (generated by scripts/vendor_js.sh; do not edit)

| file | package | licence |
|---|---|---|
| embed-amd.js | @jupyter-widgets/html-manager $HTML_MANAGER_VERSION (dist/embed-amd.js) | BSD-3-Clause, licenses/html-manager-LICENSE |
| require.js | requirejs $REQUIREJS_VERSION (require.js) | MIT, licenses/requirejs-LICENSE |
| mathjax/tex-mml-chtml.js, mathjax/output/chtml/fonts/woff-v2/ | mathjax $MATHJAX_VERSION (es5/) | Apache-2.0, licenses/mathjax-LICENSE |

Served through \`html_static_path\` in _config.yml so the built book makes no request to a CDN.
README
(cd "$dest" && find . -type f ! -name SHA256SUMS | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)
du -sh "$dest"
