"""tokenizer_strings: the corpus test_tokenizer_hf.py tokenizes with the engine and with Hugging Face.

STRINGS are plain text: every one is compared with special-token parsing off and on (they hold no
special-token text except where noted). SPECIAL_STRINGS hold ChatML and other control-token text and
are compared with special-token parsing on. All are valid UTF-8 (Hugging Face takes str only);
invalid UTF-8 is covered by the C unit test.

Nothing here depends on a model: the same strings run against every vocabulary under test.
"""

# ---- ASCII prose ----
PROSE = [
    "Hello world",
    "Hello, world!",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness...",
    "Call me Ishmael. Some years ago - never mind how long precisely - having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about.",
    "e.g. i.e. etc. vs. Mr. Mrs. Dr. St. U.S.A. a.m. p.m.",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.",
    "a",
    "A",
    "I",
    "ab",
    "abc",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "antidisestablishmentarianism and floccinaucinihilipilification",
    "What's up? Not much. You?",
    "Yes! No? Maybe... (perhaps) [certainly] {never}",
    "CamelCaseIdentifier snake_case_identifier SCREAMING_SNAKE kebab-case-name",
    "HTTPServerError XMLHttpRequest iPhone eBay McDonald's",
    "email me at someone@example.com or visit https://example.org/path?q=1&r=two#frag",
    "Version 2.0.1-beta+build.42 released on 2024-03-15T12:34:56Z",
    "The answer is 42, not 41 or 43.",
    "\"Quoted text\" and 'single quoted' and `backticks`",
]

# ---- Contractions, lower and upper case ----
CONTRACTIONS = [
    "it's isn't they're we've I'm you'll he'd",
    "IT'S ISN'T THEY'RE WE'VE I'M YOU'LL HE'D",
    "It'S iSn'T tHeY'Re We'Ve i'M yOu'Ll hE'd",
    "'s 't 're 've 'm 'll 'd",
    "'S 'T 'RE 'VE 'M 'LL 'D",
    "don't won't can't shouldn't wouldn't couldn't",
    "DON'T WON'T CAN'T",
    "y'all ma'am o'clock rock'n'roll",
    "'tis 'twas the night",
    "the dog's bone, the dogs' bones",
    "it''s it'''s ''",
    "x's 9's _'s",
    "Jones' and Charles's",
    "l'homme d'affaires aujourd'hui",
]

# ---- Code ----
CODE = [
    '#include <stdio.h>\n\nint main(void)\n{\n    printf("Hello, world!\\n");\n    return 0;\n}\n',
    "static int\nadd(int a, int b)\n{\n\treturn a + b;\n}\n",
    "for (size_t i = 0; i < n; i++) {\n        sum += x[i] * y[i];\n}",
    "if (p == NULL || *p != '\\0') goto err; /* comment */ // another",
    "#define MAX(a, b) ((a) > (b) ? (a) : (b))",
    "uint64_t x = 0xDEADBEEFull; x >>= 3; x ^= x << 7;",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Foo(Bar):\n    \"\"\"Docstring.\"\"\"\n\n    def __init__(self, *args, **kwargs):\n"
    "        super().__init__(*args, **kwargs)\n",
    "print(f\"{x!r:>10} {y:.3f} {z=}\")",
    "lambda x: [i ** 2 for i in range(x) if i % 2 == 0]",
    "import numpy as np\narr = np.zeros((3, 4), dtype=np.float32)\n",
    '{"name": "llm-fcgi", "version": 1, "tags": ["a", "b"], "nested": {"ok": true, "n": null}}',
    '{\n  "model": "default",\n  "messages": [\n    {"role": "user", "content": "Hi"}\n  ]\n}',
    '[1, 2.5, -3e10, "\\u00e9", "\\n", {}]',
    "#!/bin/sh\nset -eu\nfor f in *.txt; do\n  wc -l \"$f\" | awk '{print $1}'\ndone\n",
    "ls -la /usr/local/bin | grep -E '^-.*x' > /tmp/out.txt 2>&1 && echo ok || echo fail",
    "echo $((1 + 2)) ${HOME:-/root} $(date +%s) `uname -a`",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE 'A%' ORDER BY id DESC;",
    "<div class=\"container\"><p id='x'>Text &amp; more &lt;tags&gt;</p></div>",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{:?}\", v); }",
    "x=1;y=2;z=x+y*3-(4/5)%6",
    "a->b.c[d]->e  &&  !f || ~g ^ h",
    "    indented with four spaces\n\tindented with a tab\n        eight spaces",
    "diff --git a/x.c b/x.c\n@@ -1,3 +1,4 @@\n-old line\n+new line\n context\n",
    "// TODO(issue-12): fix this\n/* multi\n * line\n */",
    "0x1F 0b1010 0o777 1_000_000 3.14e-10 .5 5.",
]

# A word some test vocabularies hold as a token that no merge reaches (see test_tokenizer_hf.py).
UNREACHABLE = ["qzxqzxqzx", "qzxqzxqzx qzxqzxqzx", "Qzxqzxqzx qzxqzxqzxq"]

# ---- Whitespace: runs of spaces, newlines, tabs and mixtures ----
WHITESPACE = [" " * n for n in range(1, 11)] + [
    "\n",
    "\n\n",
    "\n\n\n",
    "\n\n\n\n\n\n\n\n",
    "\t",
    "\t\t",
    "\t\t\t\t",
    "\r\n",
    "\r\n\r\n",
    "\r",
    " \n",
    "\n ",
    " \n ",
    "\t\n",
    "\n\t",
    " \t \t ",
    "a  b",
    "a   b",
    "a    b",
    "a\tb",
    "a\t\tb",
    "a\nb",
    "a\n\nb",
    "a \n b",
    "a  \n  b",
    "word   ",
    "   word",
    "   word   ",
    "trailing newline\n",
    "two trailing newlines\n\n",
    "\n\nleading newlines",
    "mixed \t\n\r\n \t  end",
    "a\u00a0b\u2009c\u3000d",  # no-break space, thin space, ideographic space
    "x\u2028y\u2029z\u0085w",  # line and paragraph separators, NEL
    "zero\u200bwidth\u200cjoin\u200dner\ufeffbom",
    "mongolian\u180evowel \u180eseparator",
    "\x0b\x0c vertical tab and form feed",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
]

# ---- Digits and numbers of all lengths ----
NUMBERS = ["1234567890123456789012"[:n] for n in range(1, 23)] + [
    "0",
    "00",
    "007",
    "3",
    "33",
    "333",
    "3333",
    "33333",
    "333333",
    "3333333",
    " 1",
    " 12",
    " 123",
    " 1234",
    "a1",
    "a12b34c",
    "1a",
    "w048 7tuijk dsdfhu",
    "3.14159",
    "-42",
    "+1 (555) 123-4567",
    "1,000,000",
    "1.000.000,00",
    "$19.99",
    "€5,49",
    "100%",
    "2^10 = 1024",
    "1st 2nd 3rd 4th 21st 22nd 101st",
    "12:34:56.789",
    "1e9 1E-9 6.02e23",
    "ied 4 \u00bd months",
    "\u00bc \u00bd \u00be \u2153 \u2154",  # vulgar fractions (\p{N})
    "\u00b2 \u00b3 \u00b9 x\u00b2",  # superscripts
    "\u2160 \u2161 \u2162 \u216b",  # Roman numerals
    "\u0660\u0661\u0662\u0663 \u06f4\u06f5",  # Arabic-Indic digits
    "\u0966\u0967\u0968 \u0e51\u0e52\u0e53",  # Devanagari, Thai digits
    "\uff11\uff12\uff13",  # full-width digits
    "\u2460\u2461\u2462",  # circled digits
]

# ---- Punctuation ----
PUNCTUATION = [
    "!!!!!!",
    "???",
    "...",
    "\u2026",
    "!?!?",
    "--- === +++ ***",
    "~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/",
    "(((nested)))",
    "a,b;c:d.e!f?g",
    "\u201csmart quotes\u201d \u2018single\u2019",
    "\u00abguillemets\u00bb \u2039single\u203a",
    "em\u2014dash en\u2013dash",
    "\u00bfQu\u00e9? \u00a1S\u00ed!",
    "\u3002\u3001\uff01\uff1f\u300c\u300d",
    "#hashtag @mention",
    "<|not a real token|>",
    "<|im_start",
    "im_end|>",
    "< |im_start| >",
    "[INST] <<SYS>> <s> </s>",
]

# ---- Emoji ----
EMOJI = [
    "\U0001f600",
    "\U0001f602\U0001f602\U0001f602",
    "Hello \U0001f44b world \U0001f30d",
    "\U0001f44d\U0001f3fd",  # skin tone modifier
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",  # family ZWJ sequence
    "\U0001f469\u200d\U0001f4bb coding",
    "\U0001f3f3\ufe0f\u200d\U0001f308",  # rainbow flag
    "\U0001f1fa\U0001f1f8 \U0001f1ef\U0001f1f5 \U0001f1e9\U0001f1ea",  # flags
    "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # Scotland tag flag
    "\u2764\ufe0f \u2764 \u263a\ufe0f",  # variation selectors
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705",
    " this is \U0001f999.cpp",
    "1\ufe0f\u20e3 #\ufe0f\u20e3",  # keycaps
    "\U0001f9d1\U0001f3ff\u200d\U0001f91d\u200d\U0001f9d1\U0001f3fb",
]

# ---- CJK ----
CJK = [
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01",
    "\u6211\u662f\u4e00\u4e2a\u5927\u8bed\u8a00\u6a21\u578b\u3002",
    "\u6f22\u5b57\u3068\u3072\u3089\u304c\u306a\u3068\u30ab\u30bf\u30ab\u30ca",
    "\u6771\u4eac\u30bf\u30ef\u30fc\u306f333\u30e1\u30fc\u30c8\u30eb\u3067\u3059",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4",
    "\uc548\ub155\ud558\uc138\uc694, \uc138\uacc4!",
    "\u4e2d\u6587English\u6df7\u5408mixed",
    "\u7e41\u9ad4\u4e2d\u6587\u8207\u7b80\u4f53\u4e2d\u6587",
    "\uff21\uff22\uff23 \uff41\uff42\uff43",  # full-width Latin
    "\U00020000\U0002a6d6",  # CJK extension B
]

# ---- Accented Latin, Cyrillic, Greek, Arabic, Hebrew, Indic, others ----
SCRIPTS = [
    "\u00c4pfel",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade \u00c5ngstr\u00f6m",
    "cafe\u0301 (combining acute)",
    "Stra\u00dfe \u1e9e \u00df",
    "\u00e0\u00e8\u00ec\u00f2\u00f9 \u00c0\u00c8\u00cc\u00d2\u00d9 \u00e2\u00ea\u00ee\u00f4\u00fb",
    "C\u1eeda Vi\u1ec7t Nam",
    "\u0141\u00f3d\u017a \u017b\u00f3\u0142\u0107 g\u0119\u015bl\u0105 ja\u017a\u0144",
    "\u00d8resund \u00e6\u00f8\u00e5 \u00c6\u00d8\u00c5",
    "\u0131\u0130 \u0130stanbul \u0131\u015f\u0131k",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438",
    "\u0420\u043e\u0441\u0441\u0438\u044f \u0438 \u0423\u043a\u0440\u0430\u0457\u043d\u0430",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03b1\u03b2\u03b3 \u03a9",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0627\u0644\u0639\u064e\u0631\u064e\u0628\u0650\u064a\u064e\u0651\u0629 \u0661\u0662\u0663",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a",
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\u1781\u179b\u1785\u17c1\u1789",
    "\u10d2\u10d0\u10db\u10d0\u10e0\u10ef\u10dd\u10d1\u10d0",
    "\u0532\u0561\u0580\u0587 \u0540\u0561\u0575\u0561\u057d\u057f\u0561\u0576",
    "\u12a0\u121b\u122d\u129b",
    "\u2200x \u2203y: x \u2264 y \u2227 \u00acz \u2192 \u221e \u2211 \u222b",
    "\u00a9 \u00ae \u2122 \u00b0C \u00b1 \u00d7 \u00f7 \u00b5",
    "\U0001d400\U0001d401\U0001d402 \U0001d7ce\U0001d7cf",  # mathematical alphanumerics
]

# ---- Mixed scripts ----
MIXED = [
    "Hello, y'all! How are you \U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e",
    "English \u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 "
    "\u05e2\u05d1\u05e8\u05d9\u05ea \u0939\u093f\u0928\u094d\u0926\u0940 \U0001f30d 123",
    "Price: \u00a51,000 / \u20ac9.99 / \u00a312 / \u20b9500",
    "\u041c\u043e\u0441\u043a\u0432\u0430-2024: \u0442\u0435\u043c\u043f\u0435\u0440\u0430\u0442\u0443\u0440\u0430 -15\u00b0C",
    "def \u4f60\u597d(\u043c\u0438\u0440): return '\U0001f600' * 3",
    "caf\u00e9\u2615 \u0431\u043e\u0440\u0449\U0001f372 \u5bff\u53f8\U0001f363",
    "abc\u0434\u0435\u0444ghi",
    "\u05d0a\u05d1b\u05d2c",
    "x\u0301y\u0302z\u0303",
    "A\u030a\u212b\u00c5",
]

# ---- Single characters, including ones on the edges of UTF-8 lengths ----
SINGLE = [
    ".",
    "'",
    "\"",
    "\\",
    "\x7f",
    "\x01",
    "\u0080",
    "\u00ff",
    "\u0100",
    "\u07ff",
    "\u0800",
    "\ufffd",
    "\uffff",
    "\U00010000",
    "\U0010ffff",
    "\U0001f999",
    "\u20ac",
    "\u00ad",  # soft hyphen (byte 173 is outside GPT-2's printable range)
    "a\x04b\x13\x14c",  # control bytes some byte-level vocabularies have no token for
]

# ---- Longer texts ----
LONG = [
    ("The tokenizer must reproduce the reference exactly, on long inputs too. " * 20).strip(),
    "\n".join(f"{i:04d}: value={i * 37 % 1000} label=item_{i}" for i in range(40)),
    " ".join(str(2**i) for i in range(70)),
    "word " * 100,
    "a" * 300,
    " " * 64 + "x" + "\n" * 32,
]

STRINGS = ([""] + PROSE + CONTRACTIONS + CODE + WHITESPACE + NUMBERS + PUNCTUATION + EMOJI + CJK
           + SCRIPTS + MIXED + SINGLE + LONG + UNREACHABLE)

# ---- Control-token text (compared with special-token parsing on) ----
SPECIAL_STRINGS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|><|im_end|>",
    "<|im_start|>user\nHello!<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "What is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>assistant\nThe answer is 4.<|im_end|>",
    "text before<|im_start|>text after",
    " <|im_start|> spaced <|im_end|> ",
    "<|im_start|><|im_start|><|im_end|><|im_end|>",
    "<|im_start|>\n\n<|im_end|>\n\n",
    "<|im_start|user|>",
    "<|im_start|x",
    "<<|im_start|>>",
    "|<|im_end|>|",
    "<|endoftext|>",
    "Document one.<|endoftext|>Document two.",
    "<|endoftext|><|endoftext|>",
    "<|im_start|>user\n\u4f60\u597d \U0001f44b<|im_end|>",
    "<s>",
    "</s>",
    "<s>Hello</s>",
    "<unk>",
    "[INST] hi [/INST]",
    "<fim_prefix>def f():\n<fim_suffix>\n    return 1<fim_middle>",
    "<repo_name>x<file_sep>y<filename>z",
    "<think>reasoning</think>answer",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "<|im_end|>  <|im_start|>",
    "<|im_start|>user<|im_end|>",
    "prefix <|im_start|>",
    "<|im_end|> suffix",
]
