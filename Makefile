# llm-fcgi: one non-recursive Makefile. Objects go under $(BUILD)/ (build/ by default; the
# sanitizer builds use build/asan and build/tsan). `make help` lists the targets.

CC      ?= cc
BUILD   ?= build
OPT     ?= -O2
SAN     ?=
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
MODEL   ?= models/default.gguf
FUZZ_SECONDS ?= 60

WARN    := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 -Wvla
SANFLAGS := $(if $(SAN),-fsanitize=$(SAN) -fno-omit-frame-pointer -fno-sanitize-recover=all,)
CFLAGS  ?=
CFLAGS  += -std=c11 -D_GNU_SOURCE $(OPT) -g $(WARN) -I. -MMD -MP -pthread $(SANFLAGS)
LDFLAGS += -pthread $(SANFLAGS)
LDLIBS  += -lpcre2-8 -lm

AVX2_FLAGS   := -mavx2 -mfma -mf16c
AVX512_FLAGS := -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni

# ---- Sources ----
LIB_SRC := $(wildcard common/*.c) $(wildcard kernels/*.c) $(wildcard kernels/cpu/*.c) \
           $(filter-out engine/main_%.c,$(wildcard engine/*.c)) \
           $(wildcard spill/*.c) $(wildcard guards/*.c)
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/%.o)
LIB     := $(BUILD)/libllm.a

BINS       := $(BUILD)/llm-run
UNIT_SRC   := $(wildcard tests/unit/test_*.c)
UNIT_BINS  := $(UNIT_SRC:tests/unit/%.c=$(BUILD)/tests/%)
TOOL_SRC   := $(wildcard tests/tools/*.c)
TOOL_BINS  := $(TOOL_SRC:tests/tools/%.c=$(BUILD)/tests/tools/%)
BENCH_SRC  := $(wildcard bench/*.c)
BENCH_BINS := $(if $(BENCH_SRC),$(BUILD)/llm-bench,)

.PHONY: all setup model test check asan tsan valgrind fuzz bench cuda format format-check clean help run
all: $(BINS) $(UNIT_BINS) $(TOOL_BINS) $(BENCH_BINS)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/kernels/cpu/%_avx2.o: kernels/cpu/%_avx2.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(AVX2_FLAGS) -c $< -o $@

$(BUILD)/kernels/cpu/%_avx512.o: kernels/cpu/%_avx512.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(AVX512_FLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/llm-run: $(BUILD)/engine/main_run.o $(LIB)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/llm-bench: $(BENCH_SRC:%.c=$(BUILD)/%.o) $(LIB)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/tests/test_%: $(BUILD)/tests/unit/test_%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -lcmocka -o $@

$(BUILD)/tests/tools/%: $(BUILD)/tests/tools/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

# ---- Set-up: Debian packages, the test venv, the default model (all idempotent) ----
setup:
	@scripts/setup.sh

model:
	@scripts/fetch-model.sh

# ---- Tests ----
# test: everything, from a fresh machine: set-up, model, build, unit and integration tests.
test: setup model
	@$(MAKE) --no-print-directory all
	@BUILD=$(BUILD) MODEL=$(MODEL) VENV=$(VENV) tests/run.sh

# check: build and run the unit tests only (no downloads).
check: all
	@BUILD=$(BUILD) tests/run.sh --unit

asan: setup model
	@$(MAKE) --no-print-directory BUILD=build/asan SAN=address,undefined OPT=-O1 all
	@BUILD=build/asan MODEL=$(MODEL) VENV=$(VENV) ASAN_OPTIONS=detect_leaks=1 tests/run.sh

tsan: setup model
	@$(MAKE) --no-print-directory BUILD=build/tsan SAN=thread OPT=-O1 all
	@BUILD=build/tsan MODEL=$(MODEL) VENV=$(VENV) tests/run.sh

valgrind: setup model all
	@BUILD=$(BUILD) MODEL=$(MODEL) VENV=$(VENV) tests/run.sh --valgrind

# ---- Fuzzing (clang libFuzzer), FUZZ_SECONDS per harness ----
FUZZ_SRC  := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BINS := $(FUZZ_SRC:tests/fuzz/%.c=build/fuzz/%)
build/fuzz/%: tests/fuzz/%.c $(LIB_SRC)
	@$(MAKE) --no-print-directory BUILD=build/fuzz/obj CC=clang OPT=-O1 \
		SAN=address,undefined,fuzzer-no-link build/fuzz/obj/libllm.a
	clang -std=c11 -D_GNU_SOURCE -O1 -g -I. -fsanitize=fuzzer,address,undefined $< \
		build/fuzz/obj/libllm.a $(LDLIBS) -o $@

fuzz: $(FUZZ_BINS)
	@set -e; for f in $(FUZZ_BINS); do \
		name=$$(basename $$f); corpus=tests/fuzz/corpus/$${name#fuzz_}; mkdir -p build/fuzz/work/$$name; \
		echo "fuzz: $$name for $(FUZZ_SECONDS) s"; \
		$$f -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 build/fuzz/work/$$name $$corpus \
			2>build/fuzz/$$name.log || { tail -n 40 build/fuzz/$$name.log; exit 1; }; \
		grep -E 'stat::number_of_executed_units' build/fuzz/$$name.log || true; \
	done

# ---- Benchmarks (print figures and ratios; never pass/fail on time) ----
bench: setup model all
	@BUILD=$(BUILD) MODEL=$(MODEL) bench/run.sh

cuda:
	@echo "make cuda: the CUDA backend is not built yet (issue 8); the CPU build needs no nvcc." >&2
	@exit 2

run: setup model all
	@scripts/run.sh

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

format-check:
	clang-format --dry-run --Werror $$(git ls-files '*.c' '*.h')

clean:
	rm -rf build

help:
	@echo "targets: all setup model test check asan tsan valgrind fuzz bench cuda run format format-check clean"

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
