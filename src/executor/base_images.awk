# The images the FROM lines of a Dockerfile (and its COPY --from) name, one per line, each
# once, in order: the defaults of its global ARGs (those before the first FROM) substituted;
# stage names, scratch and references still holding a variable left out. Both executors pull
# these with the credentials of the build before the step that runs the Dockerfile, which holds
# none. No single quote in this file: the scripts of the builder pod embed it in one.
{ sub(/\r$/, "") }
{ keyword = tolower($1) }
keyword == "arg" && !from_seen {
    for (n = 2; n <= NF; n++) {
        eq = index($n, "=")
        if (eq > 1) {
            value = substr($n, eq + 1)
            if (value ~ /^".*"$/) value = substr(value, 2, length(value) - 2)
            defaults[substr($n, 1, eq - 1)] = value
        }
    }
    next
}
keyword == "from" {
    from_seen = 1
    n = 2
    while (n <= NF && substr($n, 1, 2) == "--") n++
    image = expand($n)
    alias = tolower($(n + 1)) == "as" ? tolower($(n + 2)) : ""
    name_image(image)
    if (alias != "") stages[alias] = 1
}
keyword == "copy" || keyword == "add" {
    for (n = 2; n <= NF && substr($n, 1, 2) == "--"; n++)
        if (tolower(substr($n, 1, 7)) == "--from=" && substr($n, 8) !~ /^[0-9]+$/)
            name_image(expand(substr($n, 8)))
}
# Prints `image` unless it is empty, scratch, the name of a stage, printed before or holds a
# variable.
function name_image(image) {
    if (image != "" && image !~ /\$/ && tolower(image) != "scratch" && !(tolower(image) in stages) && !(image in printed)) {
        printed[image] = 1
        print image
    }
}
# `text` with each $NAME and ${NAME} of a known default replaced; from the first other
# variable on, the rest is left as it is.
function expand(text,    out, at, braced, name) {
    out = ""
    while ((at = index(text, "$")) > 0) {
        out = out substr(text, 1, at - 1)
        text = substr(text, at + 1)
        braced = substr(text, 1, 1) == "{"
        if (braced) text = substr(text, 2)
        name = match(text, /^[A-Za-z_][A-Za-z0-9_]*/) ? substr(text, 1, RLENGTH) : ""
        if (name == "" || !(name in defaults) || (braced && substr(text, RLENGTH + 1, 1) != "}"))
            return out "$" text
        out = out defaults[name]
        text = substr(text, RLENGTH + 1 + braced)
    }
    return out text
}
