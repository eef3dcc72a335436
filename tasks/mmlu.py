"""MMLU: four-option questions on 57 subjects. cais/mmlu, config 'all' (or one subject); rows {question,
subject, choices: [4 strings], answer: 0-3}."""
HUB = 'cais/mmlu'
SPLIT, FEWSHOT_SPLIT, SAMPLER = 'test', 'dev', 'first'


def example(row):
    """lm-eval-harness's mmlu: a line naming the subject, the question with its lettered options, 'Answer:'
    continued by a letter (so acc_norm is acc: every choice is one letter)."""
    options = ''.join(f"{letter}. {choice}\n" for letter, choice in zip('ABCD', row['choices']))
    subject = row['subject'].replace('_', ' ')
    return dict(query=f"{row['question'].strip()}\n{options}Answer:", choices=list('ABCD'), gold=row['answer'],
                description=f"The following are multiple choice questions (with answers) about {subject}.\n\n",
                subject=row['subject'], question=row['question'].strip(), options=row['choices'], letters='ABCD')
