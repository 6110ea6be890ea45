// Code compiled once per CPU instruction set. setup.py compiles every source
// that opens a namespace named NORMEXT_CPU_CAPABILITY once per capability it
// builds (DEFAULT, AVX2, AVX512; or NATIVE alone), defining the macro to that
// name, and batch_norm/cpu/dispatch.cpp calls the one torch runs. A kernel
// header includes this file and puts all of its code, inline functions and
// templates included, in such a namespace:
//     namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
// so that the linker cannot merge an AVX-512 copy of an inline function with
// the baseline one (one definition per capability, never shared).
#pragma once

#ifndef NORMEXT_CPU_CAPABILITY
#error "CPU kernel code, compiled per capability by setup.py; the code compiled once includes batch_norm/cpu/dispatch.h"
#endif
