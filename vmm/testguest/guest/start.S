/* Entry point, reached in 64-bit long mode like a Linux vmlinux entered by a VMM:
   identity-mapped paging set up by the VMM, interrupts off, RSI = boot_params (zero page). */
    .section .text.start, "ax"
    .globl _start
    .code64
_start:
    mov     %cs, %eax           /* at CPL 3 (kiln EntryMode::User) cli faults under PVM */
    test    $3, %al
    jnz     2f
    cli
2:
    lea     kt_stack_top(%rip), %rsp
    xor     %ebp, %ebp
    mov     %rsi, %rdi          /* kmain(boot_params) */
    call    kmain
1:  /* kmain never returns; if it does, reset through the i8042 and spin. */
    mov     $0xfe, %al
    out     %al, $0x64
    jmp     1b

    .section .noinit, "aw", @nobits
    .balign 16
kt_stack:
    .skip   65536
    .globl  kt_stack_top
kt_stack_top:
